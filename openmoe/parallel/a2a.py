"""The all_to_all variants of the expert-parallel exchange, as start/wait pairs autograd can
pipeline:

  flat          one all_to_all_single over the EP group (uneven splits);
  hierarchical  two: inside each node (to the local peer with the destination's local index),
                then across nodes between the ranks with the same local index (one peer per
                node). Each row crosses the inter-node links once, in messages ranks_per_node
                times larger and fewer: what pays where inter-node latency dominates.

Both deliver the same rows in the same order (source-rank major), so the results are equal
bit for bit. Sizes are host ints (`Route`), known before the exchange starts.

`exchange_start(x, route)` launches the exchange (async_op=True) and returns a tensor that is
valid only after `exchange_wait(out, box)`; autograd runs the same pair in reverse in backward
(the reverse exchange is launched by the wait's backward and waited in the start's backward),
so what the engine schedules between them overlaps with it. torch's differentiable all_to_all
(`_functional_collectives.all_to_all_single_autograd`) waits inside its backward, which leaves
nothing to overlap there: hence these two small Functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Hierarchy:
    """An EP group of `nodes` x `ranks_per_node` ranks: EP rank e sits on node e // L with local
    index e % L (the EP group is consecutive ranks, parallel/mesh.py, and L divides it)."""

    ranks_per_node: int
    nodes: int
    local_group: dist.ProcessGroup  # the EP ranks on this node
    node_group: dist.ProcessGroup  # the EP ranks with this local index, one per node


def build_hierarchy(ep_group: dist.ProcessGroup, ranks_per_node: int) -> Hierarchy:
    """The two sub-groups of every EP group (collective: every rank of the world calls it)."""
    ep, world = dist.get_world_size(ep_group), dist.get_world_size()
    L = ranks_per_node
    if not 1 < L < ep or ep % L:
        raise ValueError(f"hierarchical all_to_all: ranks_per_node={L} must divide the EP size {ep} and lie "
                         f"strictly between 1 and {ep} (one node: nothing to split)")
    ranks = dist.get_process_group_ranks(ep_group)
    base = ranks[0] - ranks[0] % ep
    if ranks != list(range(base, base + ep)):
        raise ValueError(f"hierarchical all_to_all: the EP group {ranks} is not {ep} consecutive ranks")
    groups = [range(b, b + ep) for b in range(0, world, ep)]  # every EP group, as parallel/mesh.py lays them out
    local, _ = dist.new_subgroups_by_enumeration([list(g[i:i + L]) for g in groups for i in range(0, ep, L)])
    node, _ = dist.new_subgroups_by_enumeration([list(g[i::L]) for g in groups for i in range(L)])
    return Hierarchy(L, ep // L, local, node)


@dataclass(frozen=True)
class Route:
    """One exchange, on the host: rows[s][d] rows go from EP rank s to EP rank d; `me` is this
    rank. The flat exchange reads this rank's row and column, the hierarchical one its node's."""

    rows: list[list[int]]
    me: int
    group: dist.ProcessGroup
    hierarchy: Hierarchy | None = None

    @property
    def send(self) -> list[int]:
        return self.rows[self.me]

    @property
    def recv(self) -> list[int]:
        return [r[self.me] for r in self.rows]

    def reverse(self) -> "Route":
        return Route([list(c) for c in zip(*self.rows)], self.me, self.group, self.hierarchy)

    def start(self, x: torch.Tensor) -> "Pending":
        """Launch the exchange of x (rows grouped by destination rank, in rank order)."""
        if self.hierarchy is None:
            out = x.new_empty(sum(self.recv), *x.shape[1:])
            return Pending(out, _launch(out, x, self.recv, self.send, self.group))
        return _HierarchicalPending(self, x)


def _launch(out, x, out_splits, in_splits, group):
    return dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)


class Pending:
    """An exchange in flight: `wait()` returns its output (valid from then on)."""

    def __init__(self, out: torch.Tensor, work):
        self.out, self.work = out, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


class _HierarchicalPending(Pending):
    """Stage 1 (in the node) is launched at start; the wait finishes it and runs stage 2 (across
    nodes), which needs stage 1's rows."""

    def __init__(self, route: Route, x: torch.Tensor):
        h, M, me = route.hierarchy, route.rows, route.me
        L, nodes = h.ranks_per_node, h.nodes
        self.route, node, self.local = route, me // L, me % L
        # stage 1: to local peer l go the rows for every (node n, local l), ordered by node
        blocks = x.split(M[me])
        x1 = _cat([blocks[n * L + l] for l in range(L) for n in range(nodes)], x)
        send1 = [sum(M[me][n * L + l] for n in range(nodes)) for l in range(L)]
        self.peers = [node * L + l for l in range(L)]  # EP ranks of this node
        recv1 = [sum(M[p][n * L + self.local] for n in range(nodes)) for p in self.peers]
        self.mid = x.new_empty(sum(recv1), *x.shape[1:])
        # the final buffer now: its shape is what autograd records for the start's output
        super().__init__(x.new_empty(sum(route.recv), *x.shape[1:]), _launch(self.mid, x1, recv1, send1, h.local_group))

    def wait(self) -> torch.Tensor:
        if self.work is None:
            return self.out
        self.work.wait()
        self.work, rows1, self.mid = None, self.mid, None
        h, M, me = self.route.hierarchy, self.route.rows, self.route.me
        L, nodes = h.ranks_per_node, h.nodes
        # received from peer p: its rows for (n, my local index), n = 0..nodes-1; regroup by node n
        sizes = [M[p][n * L + self.local] for p in self.peers for n in range(nodes)]
        blocks = rows1.split(sizes)
        x2 = _cat([blocks[i * nodes + n] for n in range(nodes) for i in range(L)], rows1)
        send2 = [sum(M[p][n * L + self.local] for p in self.peers) for n in range(nodes)]
        recv = self.route.recv  # from node n: its ranks in local order, i.e. source-rank order
        recv2 = [sum(recv[n * L:(n + 1) * L]) for n in range(nodes)]
        _launch(self.out, x2, recv2, send2, h.node_group).wait()
        return self.out


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like[:0]


class Box:
    """The exchanges of one start/wait pair: forward's, then the reverse one in backward."""

    fwd: Pending | None = None
    bwd: Pending | None = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route, box):
        ctx.box = box
        box.fwd = route.start(x)
        return box.fwd.out

    @staticmethod
    def backward(ctx, _passed):
        grad = ctx.box.bwd.wait()  # launched by _Wait.backward
        ctx.box.bwd = None
        return grad, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, route, box):
        ctx.route, ctx.box = route, box
        res = box.fwd.wait()
        box.fwd = None
        return res

    @staticmethod
    def backward(ctx, grad):
        ctx.box.bwd = ctx.route.reverse().start(grad.contiguous())
        # the reverse exchange's result (the start's input gradient) comes from _Start.backward,
        # after its wait; what passes between the two is only a token of the right shape
        return grad, None, None


def exchange_start(x: torch.Tensor, route: Route) -> tuple[torch.Tensor, Route, Box]:
    """Launch the exchange of x's rows (grouped by destination); differentiable with exchange_wait."""
    box = Box()
    return _Start.apply(x, route, box), route, box


def exchange_wait(started: tuple[torch.Tensor, Route, Box]) -> torch.Tensor:
    """The received rows (source-rank major), once the exchange is done."""
    return _Wait.apply(*started)


def exchange(x: torch.Tensor, route: Route) -> torch.Tensor:
    """Blocking, differentiable exchange."""
    return exchange_wait(exchange_start(x, route))
