"""Swap search for the expert balancer, communication-aware (ColossalAI-MoE's LoadBalancer idea).

balance.search_placement re-places every expert to minimise the most loaded rank, whatever it
moves. This search instead proposes a few swaps of two experts between EP ranks and weighs what
a swap buys against what it costs to move:

  score(state) = imbalance + comm_weight * moved
  imbalance    = (max rank load - mean rank load) / mean rank load
  moved        = experts not on their original rank, each counted 1 if it crossed inside a
                 node and inter_node_cost if it crossed nodes. All experts of a layer have the
                 same size (weights + optimizer state), so this is bytes moved in units of one
                 expert, with a node's fast links cheaper than the network.

Beam search (width `beam`, at most `max_swaps` swaps deep): a state's children swap one expert of
its most loaded rank (ties: the lowest rank) with a lighter expert of another rank; the `beam`
best children by (score, spread of the rank loads, assignment) go on, and the best state seen is
kept, so a swap that only helps together with the next one (two hot ranks) is still found.
Inside a node first (ColossalAI's local swap): only partners on the hot rank's node; if that does
not bring the imbalance within `tolerance`, again from the start and the local beam with any
partner (global swap). The result is applied only if it lowers the score by more than
`tolerance`, so measured noise does not reshuffle experts (and a layer already within tolerance
is left alone).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SwapSearch:
    beam: int = 8
    tolerance: float = 0.1  # imbalance counted as balanced; the least score gain worth a move
    comm_weight: float = 0.01  # score per expert moved inside a node
    inter_node_cost: float = 8.0  # an expert moved across nodes costs this many intra-node moves
    max_swaps: int = 8

    def __post_init__(self):
        if self.beam < 1 or self.max_swaps < 0:
            raise ValueError(f"SwapSearch: beam={self.beam} must be >= 1 and max_swaps={self.max_swaps} >= 0")
        for k in ("tolerance", "comm_weight", "inter_node_cost"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"SwapSearch: {k}={getattr(self, k)!r} must be >= 0")


@dataclass(frozen=True)
class SwapPlan:
    placement: list[int]  # placement[e] = slot of expert e (the old one when not applied)
    swaps: list[tuple[int, int]]  # expert pairs swapped, in order (empty when not applied)
    imbalance_before: float
    imbalance_after: float  # of the best state found (applied or not)
    score_before: float
    score_after: float
    applied: bool


@dataclass(frozen=True)
class _State:
    rank_of: tuple[int, ...]
    loads: tuple[float, ...]
    swaps: tuple[tuple[int, int], ...]
    score: float
    spread: float


def imbalance(loads) -> float:
    mean = sum(loads) / len(loads)
    return (max(loads) - mean) / mean if mean > 0 else 0.0


def ep_rank_nodes(ep_group_ranks: list[int], ranks_per_node: int) -> list[int]:
    """Node of each EP rank, from the global ranks of the EP group (torchrun puts ranks_per_node
    = LOCAL_WORLD_SIZE consecutive ranks on a node)."""
    return [r // ranks_per_node for r in ep_group_ranks]


def search_swaps(load_E: list[float], placement: list[int], ep: int, node_of_rank: list[int],
                 opts: SwapSearch = SwapSearch()) -> SwapPlan:
    """The swaps to apply to `placement` (see the module docstring)."""
    E = len(load_E)
    per = E // ep
    if per * ep != E or sorted(placement) != list(range(E)) or len(node_of_rank) != ep:
        raise ValueError(f"search_swaps: {E} experts, placement {placement}, {ep} ranks, nodes {node_of_rank}")
    home = tuple(s // per for s in placement)
    start = _state(load_E, home, home, (), ep, node_of_rank, opts)
    plan = lambda best, applied: SwapPlan(  # noqa: E731
        _apply(placement, best.swaps) if applied else list(placement), list(best.swaps) if applied else [],
        imbalance(start.loads), imbalance(best.loads), start.score, best.score, applied)
    if imbalance(start.loads) <= opts.tolerance:
        return plan(start, False)
    local = lambda a, b: node_of_rank[a] == node_of_rank[b]  # noqa: E731
    best, beam = _beam(load_E, home, [start], local, ep, node_of_rank, opts)
    if imbalance(best.loads) > opts.tolerance:
        best2, _ = _beam(load_E, home, _unique([start, best, *beam]), lambda a, b: True, ep, node_of_rank, opts)
        best = min(best, best2, key=_key)
    return plan(best, start.score - best.score > opts.tolerance)


def _beam(load_E, home, states, allowed, ep, nodes, opts: SwapSearch):
    best = min(states, key=_key)
    for _ in range(opts.max_swaps):
        children = _unique(c for s in states for c in _children(load_E, home, s, allowed, ep, nodes, opts))
        if not children:
            break
        states = sorted(children, key=_key)[:opts.beam]
        best = min(best, states[0], key=_key)
        if imbalance(best.loads) <= opts.tolerance:
            break
    return best, states


def _children(load_E, home, s: _State, allowed, ep, nodes, opts):
    hi = max(range(ep), key=lambda r: (s.loads[r], -r))  # the most loaded rank, lowest on ties
    for a, ra in enumerate(s.rank_of):
        if ra != hi:
            continue
        for b, rb in enumerate(s.rank_of):
            if rb != hi and allowed(hi, rb) and load_E[a] > load_E[b]:
                rank_of = list(s.rank_of)
                rank_of[a], rank_of[b] = rb, hi
                yield _state(load_E, home, tuple(rank_of), s.swaps + ((a, b),), ep, nodes, opts)


def _state(load_E, home, rank_of, swaps, ep, nodes, opts: SwapSearch) -> _State:
    loads = [0.0] * ep
    for e, r in enumerate(rank_of):
        loads[r] += load_E[e]
    moved = sum(1.0 if nodes[h] == nodes[r] else opts.inter_node_cost for h, r in zip(home, rank_of) if h != r)
    mean = sum(loads) / ep
    spread = sum((x - mean) ** 2 for x in loads) / (ep * mean * mean) if mean > 0 else 0.0
    return _State(rank_of, tuple(loads), swaps, imbalance(loads) + opts.comm_weight * moved, spread)


def _key(s: _State):
    return (round(s.score, 12), round(s.spread, 12), s.rank_of)


def _unique(states) -> list[_State]:
    seen = {}
    for s in states:  # one state per assignment: the first (fewest swaps) reaching it
        seen.setdefault(s.rank_of, s)
    return list(seen.values())


def _apply(placement: list[int], swaps) -> list[int]:
    slot = list(placement)
    for a, b in swaps:
        slot[a], slot[b] = slot[b], slot[a]
    return slot
