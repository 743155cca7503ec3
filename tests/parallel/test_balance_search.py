"""openmoe/parallel/balance_search.py on hand-worked cases: load and communication cost, inside a
node before across nodes, a tolerance against reshuffling for noise.

Scores by hand: imbalance = (max - mean) / mean of the rank loads; + comm_weight (0.01) per expert
off its rank inside a node, 8x that (0.08) across nodes. Ties between equal scores go to the
smaller assignment tuple (rank of expert 0, rank of expert 1, ...)."""

import pytest

from openmoe.parallel.balance import rank_loads
from openmoe.parallel.balance_search import SwapSearch, ep_rank_nodes, imbalance, search_swaps

IDENTITY8 = list(range(8))


def test_local_swaps_first_when_they_suffice():
    # 4 EP ranks x 2 slots; ranks 0, 1 on node 0, ranks 2, 3 on node 1.
    # rank loads [4+4, 2+2, 2+2, 4+4] = [8, 4, 4, 8], mean 6: imbalance 1/3.
    load = [4, 4, 2, 2, 2, 2, 4, 4]
    # Inside node 0, a 4 of rank 0 <-> a 2 of rank 1: [6, 6, 4, 8] (still 1/3, + 0.02); of the four
    # equal swaps e1 <-> e2 has the smallest assignment (0, 1, 0, 1, ...). Then rank 3 (8) inside
    # node 1: a 4 <-> a 2 of rank 2 -> [6, 6, 6, 6], imbalance 0 + 4 local moves = 0.04; the
    # smallest assignment is e5 <-> e6. Within tolerance: no search across nodes (which would
    # reach the same loads for 4 x 0.08 = 0.32).
    p = search_swaps(load, IDENTITY8, 4, [0, 0, 1, 1], SwapSearch(beam=4))
    assert p.swaps == [(1, 2), (6, 5)]
    assert p.placement == [0, 2, 1, 3, 4, 6, 5, 7]
    assert rank_loads(load, p.placement, 4) == [6, 6, 6, 6]
    assert p.score_before == pytest.approx(1 / 3) and p.score_after == pytest.approx(0.04)
    assert p.applied  # gain 1/3 - 0.04 > 0.1


def test_inside_the_node_first_even_at_no_cost():
    # The same loads with ranks 0, 2 on node 0 and 1, 3 on node 1 (EP strided across nodes) and
    # no communication cost: a global search would take e1 <-> e2 (rank 0 <-> rank 1, the smallest
    # assignment of the equal first swaps). Inside node 0 first: rank 0 <-> rank 2, e1 <-> e4 ->
    # [6, 4, 6, 8]; then rank 3 <-> rank 1 inside node 1, e6 <-> e3 (smallest assignment
    # (0, 2, 1, 3, 0, 2, 1, 3)) -> [6, 6, 6, 6].
    load = [4, 4, 2, 2, 2, 2, 4, 4]
    p = search_swaps(load, IDENTITY8, 4, [0, 1, 0, 1], SwapSearch(beam=4, comm_weight=0.0))
    assert p.swaps == [(1, 4), (6, 3)]
    assert p.placement == [0, 4, 2, 6, 1, 5, 3, 7] and p.score_after == 0 and p.applied


def test_across_nodes_when_a_node_is_hot():
    # ranks 0, 1 (node 0) hold four 5s: [10, 10, 2, 2], mean 6, imbalance 2/3. Inside node 0 every
    # swap has equal loads (no child), so the search goes across nodes: e1 <-> e4 (a 5 of rank 0
    # <-> a 1 of rank 2, the smallest assignment of 8 equal swaps) gives [6, 10, 6, 2]: still
    # 2/3 (+ 0.16) but kept in the beam; then rank 1 with rank 3: e3 <-> e6 -> [6, 6, 6, 6]:
    # 0 + 4 experts across nodes x 0.08 = 0.32.
    load = [5, 5, 5, 5, 1, 1, 1, 1]
    p = search_swaps(load, IDENTITY8, 4, [0, 0, 1, 1], SwapSearch(beam=4))
    assert p.swaps == [(1, 4), (3, 6)]
    assert p.placement == [0, 4, 2, 6, 1, 5, 3, 7]
    assert p.imbalance_after == 0 and p.score_after == pytest.approx(0.32) and p.applied


def test_tolerance_leaves_noise_alone():
    # [3.1 + 3.0, 3.0 + 2.9] = [6.1, 5.9]: imbalance 0.1 / 6 = 0.017 <= 0.1: no search, no move
    p = search_swaps([3.1, 3.0, 3.0, 2.9], [0, 1, 2, 3], 2, [0, 0])
    assert not p.applied and p.swaps == [] and p.placement == [0, 1, 2, 3]


def test_communication_cost_decides():
    # [4 + 3, 3 + 2] = [7, 5], imbalance 1/6. e1 <-> e3 (or e0 <-> e2) gives [6, 6]; e1 <-> e3 has
    # the smaller assignment (0, 1, 1, 0).
    load, old = [4, 3, 3, 2], [0, 1, 2, 3]
    # same node: 0 + 2 x 0.01 = 0.02, gain 0.147 > 0.1: applied
    p = search_swaps(load, old, 2, [0, 0])
    assert p.applied and p.swaps == [(1, 3)] and p.placement == [0, 3, 2, 1]
    # across nodes: 0 + 2 x 0.08 = 0.16, gain 0.007 < 0.1: not applied ...
    p = search_swaps(load, old, 2, [0, 1])
    assert not p.applied and p.placement == old and p.score_after == pytest.approx(0.16)
    # ... at tolerance 0.01 it is not worth it either (0.007 < 0.01); at 0.005 it is,
    p = search_swaps(load, old, 2, [0, 1], SwapSearch(tolerance=0.01))
    assert not p.applied
    p = search_swaps(load, old, 2, [0, 1], SwapSearch(tolerance=0.005))
    assert p.applied and p.placement == [0, 3, 2, 1]
    # unless the move costs more than it buys: 2 x 0.16 = 0.32 > 1/6
    p = search_swaps(load, old, 2, [0, 1], SwapSearch(tolerance=0.0, comm_weight=0.02))
    assert not p.applied and p.score_after == pytest.approx(1 / 6)


def test_search_starts_from_the_current_placement():
    # experts 0 and 3 already swapped (placement [3, 1, 2, 0]): rank 0 holds e1, e3 = 3 + 2, rank 1
    # holds e0, e2 = 4 + 3: [5, 7], the hot rank is 1. e0 <-> e1 and e2 <-> e3 (d = 1) both give
    # [6, 6] for 2 moves (0.02); e0 <-> e1 has the smaller assignment (0, 1, 1, 0): slots 3 <-> 1.
    load = [4, 3, 3, 2]
    p = search_swaps(load, [3, 1, 2, 0], 2, [0, 0])
    assert p.swaps == [(0, 1)] and rank_loads(load, p.placement, 2) == [6, 6]
    assert p.placement == [1, 3, 2, 0]


def test_helpers_and_bad_input():
    assert imbalance([8, 4]) == pytest.approx(1 / 3)
    # EP strided across nodes (ep_inside=False, dp 2, 4 ranks a node): EP group ranks 0, 2, 4, 6
    assert ep_rank_nodes([0, 2, 4, 6], 4) == [0, 0, 1, 1]
    assert ep_rank_nodes([0, 1, 2, 3], 4) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="search_swaps"):
        search_swaps([1, 2, 3], [0, 1, 2], 2, [0, 0])
    with pytest.raises(ValueError, match="tolerance"):
        SwapSearch(tolerance=-1)


def _train_worker(rank, port, out, swap):
    import json
    import os
    import sys

    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import join_gloo, seeded_ep_model
    from openmoe.parallel import build_state, sync_gradients
    from openmoe.parallel.balance import ExpertBalancer

    join_gloo(rank, port, 2)
    ps = build_state(2)
    cfg, model = seeded_ep_model(ps, capacity_policy="t5x", capacity_factor_train=0.75, num_experts=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bal = ExpertBalancer(model, opt, ps, every=2 if swap else 0, search=SwapSearch(tolerance=0.0))
    g = torch.Generator().manual_seed(7)
    losses, placements = [], []
    for step in range(1, 6):
        ids = [torch.randint(2, cfg.vocab_size, (2, 12), generator=g) for _ in range(2)][rank]
        out_ = model(ids, labels=ids)
        out_.loss.backward()
        sync_gradients(model, ps)
        opt.step()
        opt.zero_grad()
        t = out_.loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / 2)
        bal.observe(out_.tokens_per_expert)
        if bal.maybe_rebalance(step):
            placements.append(bal.state())
    with open(os.path.join(out, f"{swap}_{rank}.json"), "w") as f:
        json.dump({"losses": losses, "placements": placements}, f)
    dist.destroy_process_group()


def test_balancer_with_swap_search_leaves_the_loss_unchanged(tmp_path):
    import json

    import torch.multiprocessing as mp
    from helpers import free_port

    for swap in (False, True):
        mp.spawn(_train_worker, args=(free_port(), str(tmp_path), swap), nprocs=2, join=True)
    a = json.loads((tmp_path / "False_0.json").read_text())
    b = json.loads((tmp_path / "True_0.json").read_text())
    assert any(p != [[0, 1, 2, 3]] * 2 for p in b["placements"]), b  # experts really moved
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
