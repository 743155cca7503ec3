"""parallelize(model, state): apply expert parallelism to a plain model from outside, as
torchtitan does. Data parallelism is applied in the training step (sync_gradients)."""

from __future__ import annotations

import torch

from .expert_parallel import shard_experts
from .mesh import ParallelState


def parallelize(model: torch.nn.Module, ps: ParallelState, fsdp: bool = False,
                param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give every rank rank 0's initial values (broadcast), shard experts over the EP group,
    and with fsdp=True shard the other parameters over all ranks with FSDP2."""
    if not ps.distributed:
        return model
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0, group=ps.world_group)
    if ps.ep > 1:
        if shard_experts(model, ps.ep_group) == 0:
            raise ValueError("ep > 1 but the model has no MoE layer")
    if fsdp:
        from .fsdp import apply_fsdp

        apply_fsdp(model, ps, param_dtype)
    return model
