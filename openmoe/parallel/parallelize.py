"""parallelize(model, state): apply expert parallelism (and optionally FSDP2) to a plain model
from outside, as torchtitan does. Gradients of whatever FSDP2 does not manage are reduced in the
training step (sync_gradients)."""

from __future__ import annotations

import torch

from .expert_parallel import shard_experts
from .mesh import ParallelState


def parallelize(model: torch.nn.Module, ps: ParallelState, fsdp: bool | int = False,
                param_dtype: torch.dtype | None = None, fsdp_experts: bool = True) -> torch.nn.Module:
    """Give every rank rank 0's initial values (broadcast; not for a model on `meta`, which each
    rank materialises afterwards: openmoe/parallel/materialize.py), split experts over the EP group, and
    with fsdp=True (or fsdp = world) shard the non-expert parameters over all ranks with FSDP2 and
    (fsdp_experts, dp > 1) each EP rank's experts over its dp replicas; with an int 1 < fsdp <
    world, hybrid sharding: non-expert parameters sharded over groups of `fsdp` consecutive ranks,
    replicated over the groups, experts replicated over dp (openmoe/parallel/fsdp.py)."""
    if not ps.distributed:
        return model
    shard_size = None if fsdp is True or fsdp is False else int(fsdp)
    if shard_size is not None and shard_size <= 1:
        fsdp, shard_size = False, None
    if shard_size is not None:
        from .fsdp import check_shard_size

        check_shard_size(shard_size, ps.world)  # before any collective
    import torch.distributed as dist

    if not next(model.parameters()).is_meta:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0, group=ps.world_group)
    if ps.ep > 1:
        if shard_experts(model, ps.ep_group) == 0:
            raise ValueError("ep > 1 but the model has no MoE layer")
    if fsdp:
        from .fsdp import apply_fsdp

        apply_fsdp(model, ps, param_dtype, shard_experts=fsdp_experts, shard_size=shard_size)
    return model
