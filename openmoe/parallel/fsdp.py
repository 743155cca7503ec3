"""FSDP2 (torch.distributed.fsdp.fully_shard) for the replicated part of the model.

Non-expert parameters (attention, dense/extra MLPs, routers, norms, embedding, lm_head) are
sharded over all ranks, one FSDP unit per decoder layer plus the root; FSDP2 reduce-scatters
their gradients as the average over all ranks, which is the right rule for them. Expert
parameters stay out of FSDP: they are already split by EP and are reduced by
grads.sync_gradients over their replicas only (sum over dp, divided by world).
Mixed precision: parameters gathered in the compute dtype, gradients reduced in fp32, fp32
master weights in the optimizer.
"""

from __future__ import annotations

import torch

from .mesh import ParallelState


def apply_fsdp(model: torch.nn.Module, ps: ParallelState, param_dtype: torch.dtype | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..moe.layer import MoELayer

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    world_mesh = init_device_mesh(device, (ps.world,), mesh_dim_names=("fsdp",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    experts = [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]
    ignored = set(experts)
    base = model.model if hasattr(model, "model") else model
    for layer in base.layers:
        fully_shard(layer, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
