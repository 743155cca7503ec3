"""Gradient reduction and clipping under data x expert parallelism.

Every rank's loss is the mean over its own tokens; the global loss is their mean over all
`world` ranks. So:
  - a replicated (non-expert) parameter's gradient is the average over all ranks;
  - an expert's gradient already holds, through the all_to_all backward, the contributions of
    every token its EP group sent it; the copies of that expert on the other dp ranks hold the
    rest. Sum over the dp group, divide by world. Averaging over the EP group (what DDP does to
    every parameter) or dividing twice is the classic EP bug; tests check the scale exactly.

Parameters FSDP2 manages (DTensors, openmoe/parallel/fsdp.py) have had their gradient reduced
by FSDP2 in backward with the same two rules (non-expert units over all ranks / world; expert
units over the dp group only, divide factor world): sync_gradients skips them, and
clip_grad_norm sums the squares of their local shards over all ranks, counting each local shard
only on the ranks at coordinate 0 of every mesh dimension it is replicated over (a DTensor's
Replicate() placements: HSDP's replicate dimension), so each element of each global tensor is
counted exactly once (an FSDP-sharded expert element lives on one (dp, ep) rank only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .mesh import ParallelState


def is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "_ep_expert", False)


def is_expert_state(p: torch.Tensor, v) -> bool:
    """Whether optimizer state `v` of parameter `p` holds one slice per expert of p's EP block:
    a tensor of p's rank with p's leading (expert) dimension. AdamW's moments are shaped like p;
    Adafactor's factored second moments are [E_l, H, 1] and [E_l, 1, I]. Such states live with
    their expert: split by EP, moved by the balancer, saved per expert."""
    return (is_expert(p) and torch.is_tensor(v) and p.dim() > 0 and v.dim() == p.dim()
            and v.shape[0] == p.shape[0])


def _allreduce_sum(grads: list[torch.Tensor], group, scale: float) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)  # one collective per group of tensors
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.mul_(scale)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2-managed): FSDP already reduced its gradient."""
    return hasattr(t, "to_local")


def sync_gradients(model: torch.nn.Module, ps: ParallelState) -> None:
    if not ps.distributed:
        return
    dense, experts = [], []
    for p in model.parameters():
        if p.grad is None or is_sharded(p):
            continue
        (experts if is_expert(p) else dense).append(p.grad)
    _allreduce_sum(dense, ps.world_group, 1.0 / ps.world)
    _allreduce_sum(experts, ps.dp_group, 1.0 / ps.world)


def _counted_here(t) -> bool:
    """Whether this rank counts its local shard of DTensor t in the norm: the one copy at
    coordinate 0 of every mesh dimension t is replicated over (HSDP: the first shard group)."""
    from torch.distributed.tensor import Replicate

    coord = t.device_mesh.get_coordinate()
    if coord is None:  # not on this mesh
        return False
    return all(c == 0 for c, pl in zip(coord, t.placements) if isinstance(pl, Replicate))


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    # the norm in the gradient's own precision (one pass, no float64 copy), squared in float64
    return torch.linalg.vector_norm(g.detach(), dtype=torch.float32).double().cpu() ** 2


def clip_grad_norm(model: torch.nn.Module, max_norm: float, ps: ParallelState) -> torch.Tensor:
    """Clip by the norm of the whole (sharded) gradient: replicated parts counted once, each
    replicated-over-dp expert once (summed over the EP group), FSDP shards (experts sharded
    over dp included) summed over all ranks. Returns the total norm."""
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    fsdp_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        if is_sharded(p.grad):
            if _counted_here(p.grad):
                fsdp_sq += _sq_norm(p.grad.to_local())
            continue
        sq = _sq_norm(p.grad)
        if is_expert(p):
            expert_sq += sq
        else:
            dense_sq += sq
    if ps.distributed and ps.ep > 1:
        dist.all_reduce(expert_sq, group=ps.ep_group)
    if ps.distributed and any(is_sharded(p) for p in model.parameters()):  # same on every rank
        dist.all_reduce(fsdp_sq, group=ps.world_group)
    total = (dense_sq + expert_sq + fsdp_sq).sqrt().float()
    if max_norm > 0 and torch.isfinite(total):
        coef = max_norm / (total + 1e-6)
        if coef < 1:
            for g in grads:
                (g.to_local() if is_sharded(g) else g).mul_(float(coef))
    return total
