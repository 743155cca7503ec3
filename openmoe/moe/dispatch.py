"""Dispatch and combine: permute the assignments so each expert's rows are contiguous, and put
the expert outputs back, weighted, in token order.

This is the seam expert parallelism replaces: an EP dispatcher exchanges the sorted rows with
all_to_all instead of keeping them local. Nothing here builds a [tokens, experts, capacity] tensor.

Static shapes, no host sync. The plan has N rows: kept assignments first, sorted by expert
(`counts_E` of them, a device tensor), then dropped ones, where the expert kernels do not look
(grouped_mm leaves those output rows unwritten). N is T * K, or the most rows capacity can keep
(groups x E x capacity) when that is smaller: t5x training keeps at most 1.25 T of the 2 T top-2
assignments, so 37.5% fewer rows are gathered, computed around and combined. The combine reads
each assignment's row through `row_S` and takes zeros for dropped ones (torch.where: the rows it
would read are unwritten memory, possibly NaN, and NaN * 0 is NaN); the dispatch zeroes the input
gradient of dropped rows for the same reason. When nothing can be dropped (known from the shapes:
dropless, or capacity >= group size, and no padding mask) there are no such rows and no masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .router import Routing, count_per_expert


@dataclass
class DispatchPlan:
    token_N: torch.Tensor  # long, source token of each sorted row
    slot_N: torch.Tensor  # long, its assignment slot t * K + k
    counts_E: torch.Tensor  # long, kept rows per expert (their sum <= N; the rest are dropped rows)
    row_S: torch.Tensor  # long, for each assignment slot s = t * K + k: its row (any row if dropped)
    weight_S: torch.Tensor  # float32 combine weight of each slot (0 if dropped)
    num_tokens: int
    top_k: int
    kept_N: torch.Tensor | None = None  # bool, row is a kept assignment; None when all are
    keep_S: torch.Tensor | None = None  # bool, slot is kept; None when all are
    # set by an expert-parallel dispatcher (parallel/expert_parallel.py): the layout of this call
    # ("ep": tokens travel by all_to_all, "gather": experts travel) and, for "ep", the exchange's
    # splits and permutation (an EPExchange); a local plan leaves both unset
    mode: str | None = None
    exchange: object | None = None


def max_kept_rows(routing: Routing, num_experts: int) -> int:
    """The most assignments capacity can keep: a static bound on the rows worth dispatching."""
    T, K = routing.expert_TK.shape
    if routing.all_kept or routing.capacity is None:
        return T * K
    # at least one row (capacity 0 keeps nothing): the combine gathers from a non-empty tensor
    return min(T * K, max(1, routing.num_groups * num_experts * routing.capacity))


class LocalDispatcher:
    """All experts on this process: a stable sort by expert id (dropped assignments last)."""

    # True for a dispatcher whose experts are split over a process group (parallel/expert_parallel.py):
    # what parallel/layers.py asks, so the scan does not import the dispatcher's module
    splits_experts = False

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        T, K = routing.expert_TK.shape
        expert_S = routing.expert_TK.reshape(-1)
        keep_S = None if routing.all_kept else routing.keep_TK.reshape(-1)
        # dropped assignments sort after every expert (key E); stable: token order inside each
        key_S = expert_S if keep_S is None else torch.where(keep_S, expert_S, num_experts)
        slot_N = torch.argsort(key_S, stable=True)[:max_kept_rows(routing, num_experts)]
        N = slot_N.shape[0]
        row_S = torch.zeros(T * K, dtype=torch.long, device=slot_N.device)
        row_S = row_S.scatter_(0, slot_N, torch.arange(N, device=slot_N.device))
        return DispatchPlan(
            token_N=slot_N // K,
            slot_N=slot_N,
            counts_E=count_per_expert(expert_S, routing.keep_TK, num_experts),
            row_S=row_S,
            weight_S=routing.weight_TK.reshape(-1),
            num_tokens=T,
            top_k=K,
            kept_N=None if keep_S is None else keep_S[slot_N],
            keep_S=keep_S,
        )

    def dispatch(self, x_TH: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for this process's experts, sorted by expert, and the count per expert."""
        return mask_rows(x_TH[plan.token_N], plan.kept_N), plan.counts_E

    def apply(self, experts, x_TH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        """dispatch -> experts -> combine (an EP dispatcher may choose another layout here)."""
        x_NH, counts = self.dispatch(x_TH, plan)
        return self.combine(experts(x_NH, counts), plan, out_dtype)

    def combine(self, y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        """Each token's K rows, weighted, summed in float32. A gather (no atomics, deterministic);
        under torch.compile gather, weights and sum fuse into one kernel."""
        H = y_NH.shape[-1]
        y_SH = mask_rows(y_NH[plan.row_S], plan.keep_S)
        y_TKH = y_SH.view(plan.num_tokens, plan.top_k, H).float()
        return (y_TKH * plan.weight_S.view(plan.num_tokens, plan.top_k, 1)).sum(dim=1).to(out_dtype)


def mask_rows(x_NH: torch.Tensor, kept_N: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of dropped assignments. torch.where, not a multiply: an expert kernel's
    output rows (and input-gradient rows) for them are unwritten memory, possibly NaN, and
    NaN * 0 is NaN. where's backward passes zeros there too."""
    if kept_N is None:
        return x_NH
    return torch.where(kept_N[:, None], x_NH, x_NH.new_zeros(()))
