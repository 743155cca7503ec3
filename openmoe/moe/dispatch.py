"""Dispatch and combine: permute kept assignments so each expert's tokens are contiguous, and
put the expert outputs back, weighted, in token order.

This is the seam expert parallelism replaces: an EP dispatcher exchanges the sorted rows with
all_to_all instead of keeping them local. Nothing here builds a [tokens, experts, capacity] tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .router import Routing


@dataclass
class DispatchPlan:
    token_N: torch.Tensor  # long, source token of each sorted row
    slot_N: torch.Tensor  # long, its assignment slot t * K + k (for the combine)
    weight_N: torch.Tensor  # float32 combine weight of each row
    counts_E: torch.Tensor  # long, rows per expert (sums to N)
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """All experts on this process: a stable sort by expert id."""

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        T, K = routing.expert_TK.shape
        slot_N = routing.keep_TK.reshape(-1).nonzero().squeeze(1)
        expert_N = routing.expert_TK.reshape(-1)[slot_N]
        order = torch.argsort(expert_N, stable=True)
        slot_N = slot_N[order]
        return DispatchPlan(
            token_N=slot_N // K,
            slot_N=slot_N,
            weight_N=routing.weight_TK.reshape(-1)[slot_N],
            counts_E=torch.bincount(expert_N, minlength=num_experts),
            num_tokens=T,
            top_k=K,
        )

    def dispatch(self, x_TH: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for this process's experts, sorted by expert, and the count per expert."""
        return x_TH[plan.token_N], plan.counts_E

    def apply(self, experts, x_TH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        """dispatch -> experts -> combine (an EP dispatcher may choose another layout here)."""
        x_NH, counts = self.dispatch(x_TH, plan)
        return self.combine(experts(x_NH, counts), plan, out_dtype)

    def combine(self, y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        """Weighted scatter of the rows into their [T*K] slots, then a sum over K. Deterministic
        (no atomics) and accumulated in float32."""
        H = y_NH.shape[-1]
        weighted = y_NH.float() * plan.weight_N[:, None]
        slots = weighted.new_zeros(plan.num_tokens * plan.top_k, H)
        slots = slots.index_copy(0, plan.slot_N, weighted)
        return slots.view(plan.num_tokens, plan.top_k, H).sum(dim=1).to(out_dtype)
