"""Expert load balancing by moving experts between EP ranks (ColossalAI-MoE's idea).

Every N steps, from the measured per-expert load, search for a placement of experts on EP
ranks (each rank keeps E/ep slots) that minimises the most loaded rank, then move the expert
weights and their optimizer state (AdamW's moments, Adafactor's factored statistics) to their
new slots (experts FSDP-sharded over dp included: gathered over dp, moved, re-split).
Routing is in logical expert ids and is untouched, so the loss is unchanged; only the all_to_all
traffic and the per-rank expert work become even. Checkpoints hold experts in logical order
(`logical_order` around the save); a resumed run moves them back to the saved placement.

Search: beam search over experts in decreasing load (each state a partial assignment; keep the
`beam` states with the smallest (max rank load, sum of squared rank loads)), then pairwise
swaps between the most loaded rank and the others while they lower the maximum.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .grads import is_expert_state, is_sharded
from .layers import expert_parallel_layers
from .mesh import ParallelState


def rank_loads(load_E: list[float], placement: list[int], ep: int) -> list[float]:
    per = len(load_E) // ep
    out = [0.0] * ep
    for e, slot in enumerate(placement):
        out[slot // per] += load_E[e]
    return out


def search_placement(load_E: list[float], ep: int, beam: int = 8) -> list[int]:
    """placement[e] = slot of expert e, minimising the most loaded of the ep ranks."""
    E = len(load_E)
    per = E // ep
    order = sorted(range(E), key=lambda e: (-load_E[e], e))
    states = [((0.0,) * ep, (0,) * ep, ())]  # (rank loads, experts per rank, ranks chosen so far)
    for e in order:
        nxt = {}
        for loads, counts, chosen in states:
            for r in range(ep):
                if counts[r] == per:
                    continue
                nl = list(loads)
                nl[r] += load_E[e]
                nc = list(counts)
                nc[r] += 1
                key = tuple(sorted(zip(nl, nc)))
                cand = (tuple(nl), tuple(nc), chosen + (r,))
                if key not in nxt:  # states equal up to rank relabelling: keep one
                    nxt[key] = cand
        states = sorted(nxt.values(), key=lambda s: (max(s[0]), sum(x * x for x in s[0])))[:beam]
    rank_of = dict(zip(order, states[0][2]))
    rank_of = _swap_refine(load_E, rank_of, ep)
    placement, fill = [0] * E, [0] * ep
    for e in range(E):  # slots inside a rank in expert order: deterministic
        r = rank_of[e]
        placement[e] = r * per + fill[r]
        fill[r] += 1
    return placement


def _swap_refine(load_E: list[float], rank_of: dict[int, int], ep: int) -> dict[int, int]:
    while True:
        loads = [0.0] * ep
        for e, r in rank_of.items():
            loads[r] += load_E[e]
        hi = max(range(ep), key=lambda r: loads[r])
        best = None
        for a in (e for e, r in rank_of.items() if r == hi):
            for b, rb in rank_of.items():
                if rb == hi:
                    continue
                d = load_E[a] - load_E[b]
                new_max = max(loads[hi] - d, loads[rb] + d)
                if d > 0 and new_max < loads[hi] - 1e-12 and (best is None or new_max < best[0]):
                    best = (new_max, a, b)
        if best is None:
            return rank_of
        _, a, b = best
        rank_of[a], rank_of[b] = rank_of[b], rank_of[a]


@torch.no_grad()
def move_experts(tensors: list[torch.Tensor], old: list[int], new: list[int], group, ep: int, rank: int
                 ) -> list[torch.Tensor]:
    """Re-home each local [E_l, ...] tensor from placement `old` to `new` with one all_to_all
    per tensor. Every rank derives the same send/receive orders from the two tables."""
    E = len(old)
    per = E // ep
    old_inv = [0] * E
    for e, s in enumerate(old):
        old_inv[s] = e
    # rows I send: my old slots, ordered by (destination rank, destination slot)
    mine = [old_inv[rank * per + j] for j in range(per)]
    send = sorted(range(per), key=lambda j: new[mine[j]])
    send_splits = [sum(1 for j in range(per) if new[mine[j]] // per == q) for q in range(ep)]
    # rows I receive: for each source rank, its experts coming to me, by destination slot
    recv_slots = []
    for q in range(ep):
        theirs = sorted((new[old_inv[q * per + j]] for j in range(per)
                         if new[old_inv[q * per + j]] // per == rank))
        recv_slots += [s - rank * per for s in theirs]
    recv_splits = [sum(1 for j in range(per) if new[old_inv[q * per + j]] // per == rank) for q in range(ep)]
    out = []
    for t in tensors:
        flat = t.reshape(per, -1)[send].contiguous()
        got = torch.empty_like(flat)
        dist.all_to_all_single(got, flat, recv_splits, send_splits, group=group)
        res = torch.empty_like(flat)
        res[recv_slots] = got
        out.append(res.view_as(t))
    return out


def move_layer(layer, optimizer, ps: ParallelState, new: list[int]) -> None:
    """Move the layer's expert weights and their per-expert optimizer state (AdamW's moments,
    Adafactor's factored statistics: grads.is_expert_state) from the layer's placement to `new`.
    Experts FSDP-sharded over dp (parallel/fsdp.py) are all-gathered over dp into the whole EP
    block first (every dp replica then moves the same block over its own EP group) and each rank
    keeps its own rows again; the FSDP parameters keep their storage."""
    from .fsdp import local_rows

    old = layer.dispatcher.placement.tolist()
    if old == list(new):
        return
    params = layer.experts.stacked_parameters()
    targets = list(params)
    for p in params:
        targets += [v for v in optimizer.state.get(p, {}).values() if is_expert_state(p, v)]
    blocks = [t.detach().full_tensor() if is_sharded(t) else t.detach() for t in targets]
    moved = move_experts(blocks, old, list(new), ps.ep_group, ps.ep, dist.get_rank(ps.ep_group))
    with torch.no_grad():
        for t, m in zip(targets, moved):
            if is_sharded(t):
                local = t.to_local()
                lo, hi = local_rows(m.shape[0], ps)
                if local.shape[0] != hi - lo:
                    raise RuntimeError(f"expert shard of {local.shape[0]} rows, expected rows [{lo}, {hi})")
                local.copy_(m[lo:hi])
            else:
                t.copy_(m)
    layer.dispatcher.placement = torch.tensor(list(new))


def place_experts(model, optimizer, ps: ParallelState, placements: list[list[int]] | None) -> None:
    """Move the experts of every expert-parallel layer to placements[i] (None: every expert in
    its logical slot, the identity)."""
    for i, (_, layer) in enumerate(expert_parallel_layers(model)):
        new = list(range(layer.num_experts)) if placements is None else placements[i]
        move_layer(layer, optimizer, ps, new)


@contextmanager
def logical_order(model, optimizer, ps: ParallelState):
    """Experts in logical order (slot e holds expert e) inside the block, as they were after it:
    what a checkpoint stores, so any ep and any placement reads expert e as expert e."""
    before = [layer.dispatcher.placement.tolist() for _, layer in expert_parallel_layers(model)]
    place_experts(model, optimizer, ps, None)
    try:
        yield
    finally:
        place_experts(model, optimizer, ps, before)


class ExpertBalancer:
    """Accumulates per-layer expert loads; every `every` steps re-places experts."""

    def __init__(self, model, optimizer, ps: ParallelState, every: int, log=print, search=None):
        """search: None, today's re-placement (search_placement, taken when it lowers the most
        loaded rank); a balance_search.SwapSearch, its communication-aware swaps."""
        self.layers = [m for _, m in expert_parallel_layers(model)]
        self.optimizer, self.ps, self.every, self.log = optimizer, ps, every, log
        self.search = search
        self.loads = [torch.zeros(m.num_experts, dtype=torch.float64) for m in self.layers]

    def observe(self, tokens_per_expert: torch.Tensor) -> None:
        """[MoE layers, E] kept assignments of this rank's micro-batch (logical experts)."""
        if not self.layers or self.every <= 0:
            return  # nothing to balance (one process, or ep = 1)
        for i, row in enumerate(tokens_per_expert):
            self.loads[i] += row.double().cpu()

    def maybe_rebalance(self, step: int) -> list[dict] | None:
        if not self.layers or self.every <= 0 or step % self.every:
            return None
        report = []
        for layer, load in zip(self.layers, self.loads):
            dist.all_reduce(load, group=self.ps.world_group)  # global load, same on every rank
            old = layer.dispatcher.placement.tolist()
            new = self._choose(load.tolist(), old)
            before = rank_loads(load.tolist(), old, self.ps.ep)
            after = rank_loads(load.tolist(), new, self.ps.ep)
            if new != old:
                move_layer(layer, self.optimizer, self.ps, new)
            mean = sum(before) / len(before) or 1.0
            report.append({"max_over_mean_before": max(before) / mean, "max_over_mean_after": max(after) / mean})
            load.zero_()
        return report

    def _choose(self, load: list[float], old: list[int]) -> list[int]:
        """The new placement (old when nothing is worth moving); the same on every rank."""
        if self.search is None:
            new = search_placement(load, self.ps.ep)
            better = max(rank_loads(load, new, self.ps.ep)) < max(rank_loads(load, old, self.ps.ep)) - 1e-9
            return new if better else old
        from .balance_search import ep_rank_nodes, search_swaps

        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.ps.world))  # torchrun's ranks per node
        nodes = ep_rank_nodes(dist.get_process_group_ranks(self.ps.ep_group), per_node)
        return search_swaps(load, old, self.ps.ep, nodes, self.search).placement

    def _move(self, layer, old: list[int], new: list[int]) -> None:
        if layer.dispatcher.placement.tolist() != list(old):
            raise ValueError(f"expert placement {layer.dispatcher.placement.tolist()} is not {old}")
        move_layer(layer, self.optimizer, self.ps, new)

    def state(self) -> list[list[int]]:
        return [m.dispatcher.placement.tolist() for m in self.layers]

    def load_state(self, placements: list[list[int]]) -> None:
        """Back to the placements of a resumed run: the checkpoint loaded the experts in logical
        order (training/checkpoint.py), so they move, with their optimizer state. A placement is
        a permutation of the E global slots, valid at any ep dividing E."""
        if not self.layers:
            return  # ep = 1: nothing to place
        if len(placements) != len(self.layers) or any(sorted(p) != list(range(m.num_experts))
                                                      for p, m in zip(placements, self.layers)):
            raise ValueError(f"expert placement of the checkpoint does not fit this model's {len(self.layers)} "
                             f"MoE layers (each a permutation of its experts)")
        for m, p in zip(self.layers, placements):
            move_layer(m, self.optimizer, self.ps, p)
