"""parallelize(model, state): apply expert parallelism to a plain model from outside, as
torchtitan does. Data parallelism is applied in the training step (sync_gradients)."""

from __future__ import annotations

import torch

from .expert_parallel import shard_experts
from .mesh import ParallelState


def parallelize(model: torch.nn.Module, ps: ParallelState) -> torch.nn.Module:
    """Shard experts over the EP group and give replicated parameters the same initial values on
    every rank (broadcast from rank 0), so a run does not depend on per-rank seeds."""
    if not ps.distributed:
        return model
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0, group=ps.world_group)
    if ps.ep > 1:
        if shard_experts(model, ps.ep_group) == 0:
            raise ValueError("ep > 1 but the model has no MoE layer")
    return model
