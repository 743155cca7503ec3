"""Adafactor: torch.optim.Adafactor's update rule and state, with the expert axis of stacked
expert weights treated as a batch axis, as T5X's Adafactor does for MoE models, and runnable on
FSDP2 (DTensor) parameters.

Why not torch's optimizer as it is:
- torch scales each step by the RMS of the whole tensor (relative step size) and clips the
  update by the RMS of the whole update. For a stack of experts [E, H, I] that couples experts:
  one expert's step depends on the others in the same tensor, so it changes with expert
  parallelism (a rank holds E/ep of them) and with balancing (which experts share a rank). T5X
  marks the expert axis as a batch axis (`'expert': FactorDim.BATCH` in
  t5x/contrib/moe/adafactor_utils.py), which averages the parameter scale and the clipping over
  each expert's own weights. A param group with `per_expert=True` does the same here, so an
  expert's step is the same whatever shares its tensor or rank.
- torch's loop squares a partial norm in place, which DTensor refuses under FSDP2. Here the
  same formulas run out of place, so DTensor's sharding rules carry the reductions.
For every other tensor the update is torch's, step for step (tests/training/test_adafactor.py
checks it bit for bit against torch.optim.Adafactor).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate


def _item(t: torch.Tensor) -> float:
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def factored_zeros(p: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero factored statistic of `shape` for the DTensor parameter p, laid out as the
    statistic comes out of _row_col_means: sharded like p, except along a dim it averages over
    (size 1 where p's is not), which is replicated. Used by the optimizer's first step and by the
    checkpoint loader, so a resumed state has the layout a fresh one has."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    placements = [Replicate() if isinstance(pl, Shard) and shape[pl.dim] != p.shape[pl.dim] else pl
                  for pl in p.placements]
    return dtensor_zeros(shape, dtype=dtype or p.dtype, device_mesh=p.device_mesh, placements=placements)


def _row_col_means(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean of g^2 over the last dim and over the second last, as torch computes them (the
    squared norm divided by the size: no g^2 tensor is made)."""
    row = torch.norm(grad, dim=-1, keepdim=True).square().div(grad.size(-1))
    col = torch.norm(grad, dim=-2, keepdim=True).square()
    if isinstance(col, DTensor) and any(p.is_partial() for p in col.placements):
        col = col.redistribute(col.device_mesh, [Replicate()] * col.device_mesh.ndim)
    return row, col.div(grad.size(-2))


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor (same hyper-parameters, state names and shapes: checkpoints hold
    `step`, `row_var`, `col_var` or `variance`), one tensor at a time; see the module docstring
    for `per_expert` groups and DTensor parameters."""

    def __init__(self, params, lr: float = 1e-2, **kwargs):
        kwargs.setdefault("foreach", False)
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            group.setdefault("per_expert", False)
            if group["per_expert"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Adafactor: a per_expert group holds stacked [E, ...] expert weights only")

    def _init_group(self, group, params, grads, *state_lists):
        """torch's, then a DTensor parameter's fresh factored statistics laid out by
        factored_zeros (torch's `new_zeros` of a DTensor gradient replicates them)."""
        has_complex = super()._init_group(group, params, grads, *state_lists)
        for p in params:
            state = self.state[p]
            if isinstance(p, DTensor) and state["step"] == 0 and "row_var" in state:
                for key in ("row_var", "col_var"):
                    state[key] = factored_zeros(p, tuple(state[key].shape), state[key].dtype)
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = [], []
            self._init_group(group, params, grads, [], [], [], [])
            for p, grad in zip(params, grads):
                self._update(p, grad, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        lr, d, wd = group["lr"], group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        lr = lr.item() if torch.is_tensor(lr) else lr
        if group["maximize"]:
            grad = -grad
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        state["step"] += 1
        step = state["step"].item()
        mix = step ** group["beta2_decay"]  # 1 - beta2_t
        rho = min(lr, 1 / (step ** 0.5))
        per_expert = group["per_expert"]
        dims = tuple(range(1, p.dim()))
        if per_expert:  # each expert's RMS: [E, 1, ...]
            alpha = (torch.linalg.vector_norm(p, dim=dims, keepdim=True) / (p[0].numel() ** 0.5)).clamp(min=eps2) * rho
        else:
            alpha = max(eps2, _item(p.norm(2)) / (p.numel() ** 0.5)) * rho
        if wd != 0:
            p.mul_(1 - lr * wd)
        if grad.dim() > 1:
            row_mean, col_mean = _row_col_means(grad)
            state["row_var"].lerp_(row_mean, mix)  # same layout (factored_zeros): in place on DTensors too
            state["col_var"].lerp_(col_mean, mix)
            row_var, col_var = state["row_var"], state["col_var"]
            var_estimate = (row_var @ col_var).div(row_var.mean(dim=-2, keepdim=True).clamp(min=eps1))
        else:
            state["variance"].lerp_(grad * grad, mix)
            var_estimate = state["variance"].clone()
        update = var_estimate.clamp(min=eps1 * eps1).rsqrt().mul(grad)
        if per_expert:
            rms = torch.linalg.vector_norm(update, dim=dims, keepdim=True) / ((update[0].numel() ** 0.5) * d)
            p.sub_(update * (alpha / rms.clamp(min=1.0)))
        else:
            denom = max(1.0, _item(update.norm(2)) / ((update.numel() ** 0.5) * d))
            p.add_(update, alpha=-alpha / denom)
