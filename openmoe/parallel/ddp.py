"""Expert parallelism inside a plain DistributedDataParallel model (Tutel's recipe).

    moe_model = MyNet(...)                      # same seed on every rank: same full expert set
    expert_parallel(moe_model)                  # rank r keeps experts [r*E/world, (r+1)*E/world)
    ddp_ignore_experts(moe_model)               # the one line DDP needs
    model = DistributedDataParallel(moe_model)

Why the helper: DDP all-reduces (averages) every parameter's gradient, but each rank now holds
different experts, so averaging them would mix unrelated weights. Excluded from DDP, an expert's
gradient already holds, through the all_to_all backward, the contributions of every rank's
tokens: the gradient of the *sum* of the ranks' losses. DDP gives the other parameters the
gradient of their *mean*, so expert gradients are divided by the world size too (a hook),
which makes a step at EP = world equal one process holding all experts on the global batch.
This assumes every rank holds E/world experts (no expert replicas); for replicas use
openmoe.parallel.parallelize, which reduces expert gradients over their replicas.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .expert_parallel import shard_experts
from .grads import is_expert


def expert_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None = None,
                    layout: str = "ep") -> torch.nn.Module:
    """Shard the experts of every MoELayer in `model` over `group` (default: all ranks)."""
    group = group or dist.group.WORLD
    if shard_experts(model, group, layout) == 0:
        raise ValueError("expert_parallel: the model has no MoELayer")
    return model


def ddp_ignore_experts(model: torch.nn.Module, world_size: int | None = None) -> list[str]:
    """Keep expert parameters out of DDP's broadcast and all-reduce, and scale their gradients
    by 1 / world_size so they match DDP's averaged ones. Call before wrapping in DDP. Returns
    the names of the excluded parameters."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if is_expert(p)]
    if not names:
        raise ValueError("ddp_ignore_experts: no expert-parallel parameters; call expert_parallel(model) first")
    world = world_size or dist.get_world_size()
    for n, p in model.named_parameters():
        if is_expert(p) and not getattr(p, "_ddp_scaled", False):
            p.register_hook(lambda g, w=world: g / w)
            p._ddp_scaled = True
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
