"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them with
all_to_all_single (uneven splits, counts exchanged first) and come back the same way.

Only dispatch and combine change: routing and capacity run on each rank's own tokens before
dispatch, exactly as on one process, so results do not depend on the EP size.

set_ep_exchange switches the exchange (same rows, same results): `chunks` > 1 pipelines the
all_to_all of one slice of the tokens with the expert GEMMs of another, forward and backward;
`ranks_per_node` makes each all_to_all hierarchical (inside nodes, then across; parallel/a2a.py).
Either way the exchange reads every rank's row counts on the host once per MoE call: one sync.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..moe.dispatch import DispatchPlan, LocalDispatcher
from ..moe.router import Routing, count_per_expert
from .a2a import Hierarchy, Route, build_hierarchy, exchange_start, exchange_wait


@dataclass
class EPExchange:
    """The exchanges of one forward call: C chunks of this rank's kept rows (chunk c: the rows of
    its c-th slice of tokens, sorted by physical expert), each sent to the experts' ranks and
    back. C = 1 is the plain exchange."""

    routes: list[Route]  # per chunk: rows between every pair of EP ranks (host ints)
    perm: list[torch.Tensor]  # per chunk: received rows (source-major) -> local-expert-major order
    local_counts: list[torch.Tensor]  # per chunk: rows per local expert after the exchange

    @property
    def kept(self) -> int:
        return sum(sum(r.send) for r in self.routes)


@dataclass(frozen=True)
class ExchangeOptions:
    chunks: int = 1  # split the tokens into this many chunks, pipelining exchanges and expert GEMMs
    hierarchy: Hierarchy | None = None  # two-stage all_to_all (in the node, then across nodes)


class AllToAllDispatcher(LocalDispatcher):
    """Physical expert slots [rank * E_l, (rank + 1) * E_l) live on EP rank `rank`;
    `placement[e]` is the slot of logical expert e (identity until the balancer moves experts).
    Routing stays in logical ids: only where an expert's weights live changes."""

    splits_experts = True

    def __init__(self, group: dist.ProcessGroup, num_experts: int, layout: str = "ep"):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"expert parallelism: {num_experts} experts do not split over ep={self.ep} ranks")
        self.local_experts = num_experts // self.ep
        self.placement = torch.arange(num_experts)
        self._placement_on = (None, None)  # (placement, its copy on the routing's device)
        self.layout = AdaptiveLayout(layout)
        self.options = ExchangeOptions()

    def _placement(self, device: torch.device) -> torch.Tensor:
        # one copy per placement (the balancer assigns a new tensor): a host-to-device copy per
        # call would be a sync on CUDA
        src, dev = self._placement_on
        if src is not self.placement or dev.device != device:
            dev = self.placement.to(device)
            self._placement_on = (self.placement, dev)
        return dev

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        device = routing.expert_TK.device
        physical = dataclasses.replace(routing, expert_TK=self._placement(device)[routing.expert_TK])
        mode = self.layout.choose(routing.expert_TK.shape[0], self.group, device)
        plan = super().plan(physical, num_experts)  # sorted by physical slot
        if mode == "gather":
            plan.mode = mode
            return plan  # tokens stay: nothing to exchange
        counts_CE = plan.counts_E.view(1, num_experts)
        if self.options.chunks > 1:
            plan, counts_CE = chunk_rows(plan, physical, num_experts, self.options.chunks)
        plan.mode, plan.exchange = mode, self._exchange_plan(counts_CE)
        return plan

    def _exchange_plan(self, counts_CE: torch.Tensor) -> EPExchange:
        """Every rank's counts (one all_gather), read on the host once: the only sync of the
        exchange, whatever the number of chunks or the all_to_all variant."""
        C, E = counts_CE.shape
        ep, El = self.ep, self.local_experts
        all_PCE = counts_CE.new_empty(ep, C, E)
        dist.all_gather(list(all_PCE.unbind(0)), counts_CE.contiguous(), group=self.group)
        rows_PCQ = all_PCE.view(ep, C, ep, El).sum(-1)  # rows from EP rank p to rank q, per chunk
        rows = rows_PCQ.permute(1, 0, 2).tolist()  # the host sync
        recv_PCL = all_PCE[:, :, self.rank * El:(self.rank + 1) * El]
        # received rows of chunk c are source-major, each source's sorted by local expert:
        # order them by (local expert, source) with one stable sort over all chunks
        n_CPL = recv_PCL.permute(1, 0, 2).reshape(-1)
        i = torch.arange(C * ep * El, device=n_CPL.device)
        c, p, e = i // (ep * El), i // El % ep, i % El
        recv_C = [sum(row[self.rank] for row in rows[k]) for k in range(C)]
        key = ((c * El + e) * ep + p).repeat_interleave(n_CPL, output_size=sum(recv_C))
        perm = torch.argsort(key, stable=True)
        offsets = [sum(recv_C[:k]) for k in range(C)]
        return EPExchange(
            routes=[Route(rows[k], self.rank, self.group, self.options.hierarchy) for k in range(C)],
            perm=[perm[o:o + n] - o for o, n in zip(offsets, recv_C)],
            local_counts=list(recv_PCL.sum(0).unbind(0)))

    def apply(self, experts, x_TH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        start = self.layout.start_timer(x_TH)
        if plan.mode == "gather":
            # experts travel (all-gathered, differentiable), tokens stay: run every expert here
            full = {name: gather_experts(p, self.group) for name, p in _stacked(experts).items()}
            x_NH, counts_E = LocalDispatcher.dispatch(self, x_TH, plan)
            y_NH = torch.func.functional_call(experts, full, (x_NH, counts_E))
            y = LocalDispatcher.combine(self, y_NH, plan, out_dtype)
        else:
            y = self._pipeline(experts, x_TH, plan, out_dtype)
        self.layout.stop_timer(plan.mode, start, y)
        return y

    def _pipeline(self, experts, x_TH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
        """Chunk c's expert GEMMs run while chunk c + 1's dispatch and chunk c - 1's combine are
        in flight (each waited just before its rows are used); in backward autograd replays it in
        reverse. One chunk: the plain exchange -> experts -> exchange."""
        ex = plan.exchange
        C = len(ex.routes)
        rows = x_TH[plan.token_N[:ex.kept]].split([sum(r.send) for r in ex.routes])  # dropped rows stay
        sent = [exchange_start(rows[0], ex.routes[0])]
        back = []
        for c in range(C):
            if c + 1 < C:
                sent.append(exchange_start(rows[c + 1], ex.routes[c + 1]))
            recv = exchange_wait(sent[c])
            y_NH = experts(recv[ex.perm[c]], ex.local_counts[c])
            y_NH = torch.empty_like(y_NH).index_copy(0, ex.perm[c], y_NH)  # back to the received order
            back.append(exchange_start(y_NH, ex.routes[c].reverse()))
        y_rows = torch.cat([exchange_wait(b) for b in back])
        dropped = plan.token_N.shape[0] - y_rows.shape[0]  # rows of dropped assignments: zeros
        if dropped:
            y_rows = torch.cat([y_rows, y_rows.new_zeros(dropped, y_rows.shape[1])])
        return super().combine(y_rows, plan, out_dtype)


def chunk_rows(plan: DispatchPlan, routing: Routing, num_experts: int, chunks: int
               ) -> tuple[DispatchPlan, torch.Tensor]:
    """Split the tokens into `chunks` contiguous slices (sizes differing by at most one): the plan
    with its kept rows sorted by (chunk, slot) - a stable sort of rows already sorted by slot -
    and the dropped rows still last (row_S follows the rows), and the kept rows per (chunk, slot)."""
    T = routing.expert_TK.shape[0]
    chunk_T = torch.arange(T, device=routing.expert_TK.device) * chunks // max(T, 1)
    chunk_TK = chunk_T[:, None].expand_as(routing.expert_TK)
    counts_CE = count_per_expert(chunk_TK * num_experts + routing.expert_TK, routing.keep_TK, chunks * num_experts)
    chunk_N = chunk_T[plan.token_N]
    key = chunk_N if plan.kept_N is None else torch.where(plan.kept_N, chunk_N, chunks)
    order = torch.argsort(key, stable=True)
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    plan = dataclasses.replace(
        plan, token_N=plan.token_N[order], slot_N=plan.slot_N[order], row_S=where[plan.row_S],
        kept_N=None if plan.kept_N is None else plan.kept_N[order])
    return plan, counts_CE.view(chunks, num_experts)


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


def set_ep_exchange(model: torch.nn.Module, chunks: int = 1, hierarchical: bool = False,
                    ranks_per_node: int | None = None) -> int:
    """Set how every expert-parallel MoE layer of `model` exchanges its tokens: split into `chunks`
    pipelined slices (1: plain); `hierarchical`: a two-stage all_to_all over nodes of
    `ranks_per_node` ranks (default torchrun's LOCAL_WORLD_SIZE). Collective when hierarchical
    (it creates the sub-groups): call it on every rank. Returns the number of layers set."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"ep_overlap_chunks={chunks!r}: must be a positive integer")
    disps = [m.dispatcher for m in model.modules() if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)]
    hierarchy = None
    if hierarchical and disps:
        if ranks_per_node is None:
            if "LOCAL_WORLD_SIZE" not in os.environ:
                raise ValueError("ep_hierarchical: give ep_ranks_per_node (no LOCAL_WORLD_SIZE: not under torchrun)")
            ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        hierarchy = build_hierarchy(disps[0].group, ranks_per_node)
    for d in disps:
        d.options = ExchangeOptions(chunks, hierarchy)
    return len(disps)


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
