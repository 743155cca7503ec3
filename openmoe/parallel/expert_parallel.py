"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them with
all_to_all_single (uneven splits, counts exchanged first) and come back the same way.

Only dispatch and combine change: routing and capacity run on each rank's own tokens before
dispatch, exactly as on one process, so results do not depend on the EP size.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..moe.dispatch import DispatchPlan, LocalDispatcher
from ..moe.router import Routing


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the reverse exchange. (Our own: the
    differentiable one in torch.distributed.nn.functional is deprecated.)"""

    @staticmethod
    def forward(ctx, out, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return None, back, None, None, None


def a2a(out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None):
    """Differentiable exchange: rows x[in_splits[i] block] go to rank i; `out` receives."""
    return _AllToAll.apply(out, x, out_splits, in_splits, group)


@dataclass
class EPExchange:
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    perm: torch.Tensor  # received rows (source-major) -> local-expert-major order
    local_counts: torch.Tensor  # rows per local expert after the exchange


class AllToAllDispatcher(LocalDispatcher):
    """Physical expert slots [rank * E_l, (rank + 1) * E_l) live on EP rank `rank`;
    `placement[e]` is the slot of logical expert e (identity until the balancer moves experts).
    Routing stays in logical ids: only where an expert's weights live changes."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, layout: str = "ep"):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"expert parallelism: {num_experts} experts do not split over ep={self.ep} ranks")
        self.local_experts = num_experts // self.ep
        self.placement = torch.arange(num_experts)
        self.layout = AdaptiveLayout(layout)

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        physical = dataclasses.replace(routing, expert_TK=self.placement.to(routing.expert_TK.device)[routing.expert_TK])
        mode = self.layout.choose(routing.expert_TK.shape[0], self.group, routing.expert_TK.device)
        plan = super().plan(physical, num_experts)  # sorted by physical slot
        plan.mode = mode
        if mode == "gather":
            return plan  # tokens stay: nothing to exchange
        send_SE = plan.counts_E.view(self.ep, self.local_experts)
        recv_SE = torch.empty_like(send_SE)
        dist.all_to_all_single(recv_SE, send_SE.contiguous(), group=self.group)  # counts first
        src = torch.arange(self.ep).repeat_interleave(self.local_experts)
        exp = torch.arange(self.local_experts).repeat(self.ep)
        flat = recv_SE.reshape(-1)
        key = (exp * self.ep + src).repeat_interleave(flat)  # order rows by (local expert, source)
        plan.exchange = EPExchange(
            send_splits=send_SE.sum(1).tolist(), recv_splits=recv_SE.sum(1).tolist(),
            perm=torch.argsort(key, stable=True), local_counts=recv_SE.sum(0))
        return plan

    def apply(self, experts, x_TH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        start = self.layout.start_timer(x_TH)
        if plan.mode == "gather":
            # experts travel (all-gathered, differentiable), tokens stay: run every expert here
            full = {name: gather_experts(p, self.group) for name, p in _stacked(experts).items()}
            x_NH, counts_E = LocalDispatcher.dispatch(self, x_TH, plan)
            y_NH = torch.func.functional_call(experts, full, (x_NH, counts_E))
            y = LocalDispatcher.combine(self, y_NH, plan, out_dtype)
        else:
            y = super().apply(experts, x_TH, plan, out_dtype)
        self.layout.stop_timer(plan.mode, start, y)
        return y

    def dispatch(self, x_TH: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        ex = plan.exchange
        rows = x_TH[plan.token_N[:sum(ex.send_splits)]]  # the kept rows come first; dropped ones stay
        out = rows.new_empty(sum(ex.recv_splits), rows.shape[1])
        recv = a2a(out, rows, ex.recv_splits, ex.send_splits, group=self.group)
        return recv[ex.perm], ex.local_counts

    def combine(self, y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        ex = plan.exchange
        back = torch.empty_like(y_NH).index_copy(0, ex.perm, y_NH)  # undo the local-expert order
        out = y_NH.new_empty(sum(ex.send_splits), y_NH.shape[1])
        y_rows = a2a(out, back, ex.send_splits, ex.recv_splits, group=self.group)
        dropped = plan.token_N.shape[0] - y_rows.shape[0]  # rows of dropped assignments: zeros
        if dropped:
            y_rows = torch.cat([y_rows, y_rows.new_zeros(dropped, y_rows.shape[1])])
        return super().combine(y_rows, plan, out_dtype)


def _stacked(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    try:
        params = experts.stacked_parameters()
    except (AttributeError, ValueError) as err:
        raise ValueError(f"the 'gather' expert layout needs stacked expert weights; "
                         f"{type(experts).__name__} has none ({err})") from None
    return {n: p for n, p in zip(experts.stacked, params)}


class _GatherExperts(torch.autograd.Function):
    """[E_l, ...] on each rank -> [E, ...] (rank-major); backward sums the full gradient over the
    group and keeps this rank's slice: the same sum over every rank's tokens the all_to_all
    backward gives in the expert-parallel layout."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        ctx.rank, ctx.n = dist.get_rank(group), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_experts(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherExperts.apply(local, group)


LAYOUTS = ("ep", "gather", "auto")


class AdaptiveLayout:
    """Which layout runs a forward call (Tutel's adaptive parallelism):
      ep      tokens travel to their experts (all_to_all), experts stay;
      gather  experts travel (all_gather, gradients summed back), tokens stay;
      auto    time both on the first calls for each token count, then keep the faster.
    The two are the same math; `auto` decides collectively (max time over the group), so every
    rank takes the same path."""

    def __init__(self, layout: str = "ep", trials: int = 2):
        if layout not in LAYOUTS:
            raise ValueError(f"expert layout {layout!r}: choose one of {LAYOUTS}")
        self.layout, self.trials = layout, trials
        self.times: dict[int, dict[str, list[float]]] = {}
        self.decided: dict[int, str] = {}

    def choose(self, num_tokens: int, group, device: torch.device) -> str:
        """The layout for this call; `device` is where the group's collectives run (NCCL: CUDA)."""
        if self.layout != "auto":
            return self.layout
        t = torch.tensor([num_tokens], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # one key on every rank
        key = int(t)
        self._key = key
        if key in self.decided:
            return self.decided[key]
        seen = self.times.setdefault(key, {"ep": [], "gather": []})
        if len(seen["ep"]) < self.trials or len(seen["gather"]) < self.trials:
            return "ep" if len(seen["ep"]) <= len(seen["gather"]) else "gather"
        mean = torch.tensor([min(seen["ep"]), min(seen["gather"])], dtype=torch.float64, device=device)
        dist.all_reduce(mean, op=dist.ReduceOp.MAX, group=group)
        self.decided[key] = "ep" if mean[0] <= mean[1] else "gather"
        return self.decided[key]

    def start_timer(self, x: torch.Tensor) -> float | None:
        if self.layout != "auto" or getattr(self, "_key", None) in self.decided:
            return None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def stop_timer(self, mode: str, start: float | None, y: torch.Tensor) -> None:
        if start is None:
            return
        if y.is_cuda:
            torch.cuda.synchronize(y.device)
        self.times[self._key][mode].append(time.perf_counter() - start)


def set_expert_layout(model: torch.nn.Module, layout: str) -> None:
    """Switch every expert-parallel MoE layer of `model` to layout "ep", "gather" or "auto"."""
    from .layers import expert_parallel_layers

    for _, m in expert_parallel_layers(model):
        if layout != "ep":
            _stacked(m.experts)  # fail now, with the reason, not mid-step
        m.dispatcher.layout = AdaptiveLayout(layout)


def shard_experts(model: torch.nn.Module, group: dist.ProcessGroup, layout: str = "ep") -> int:
    """Keep only this EP rank's experts in every MoE layer and route through all_to_all.
    Returns the number of MoE layers changed. Expert parameters get `_ep_expert = True`.

    Every rank must hold the same full expert set before the call (same seed, or broadcast):
    slicing it is what makes expert init differ across EP ranks, match across replicas, and
    equal one process holding all experts. A layer shared by several blocks is sharded once."""
    from .layers import moe_layers

    n = 0
    for _, layer in moe_layers(model):  # unique modules: shared (WideNet) layers come once
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            continue
        disp = AllToAllDispatcher(group, layer.num_experts, layout)
        if layout != "ep":
            _stacked(layer.experts)
        layer.experts.shard_(disp.rank * disp.local_experts, (disp.rank + 1) * disp.local_experts)
        layer.dispatcher = disp
        n += 1
    return n
