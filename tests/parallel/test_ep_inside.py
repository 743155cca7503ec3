"""The two rank-to-mesh mappings of openmoe/parallel/mesh.py (ColossalAI's use_ep_inside) at 4
gloo ranks = dp 2 x ep 2: the groups are as specified, and EZ-MoE training (FSDP2 over all ranks,
experts split by EP and sharded over dp) gives the same losses, gradient norms and weights in
both layouts as one process: the same math, placed on other ranks."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank, world, port, out_dir):
    sys.path.insert(0, os.path.dirname(HERE))
    import torch.distributed as dist

    from helpers import compare_and_step, join_gloo, seeded_twins, tiny_config
    from openmoe.parallel import build_state
    from openmoe.parallel.fsdp import global_expert

    join_gloo(rank, port, world)
    res = {}
    for ep_inside in (True, False):
        ps = build_state(2, ep_inside=ep_inside)
        cfg = tiny_config(capacity_policy="dropless", num_experts=4)
        ref, model = seeded_twins(cfg, ps, fsdp=True)
        g = torch.Generator().manual_seed(123)
        batches = [torch.randint(2, cfg.vocab_size, (2, 12), generator=g) for _ in range(world)]
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        r = {"ep": dist.get_process_group_ranks(ps.ep_group), "dp": dist.get_process_group_ranks(ps.dp_group),
             "coord": ps.mesh.get_coordinate(), "ep_rank": dist.get_rank(ps.ep_group), "loss": 0.0, "norm": 0.0,
             "losses": []}
        for _ in range(2):
            ref_loss = sum(ref(b, labels=b).loss for b in batches) / world
            ref_loss.backward()
            out = model(batches[rank], labels=batches[rank])
            out.loss.backward()
            losses = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(losses, out.loss.detach())
            r["losses"].append(float(sum(losses) / world))
            compare_and_step(r, ref, opt_ref, ref_loss, model, opt, out.loss, ps)
        ref_params = dict(ref.named_parameters())
        r["param"] = max(float(((global_expert(p, ps) if ".mlp.experts." in n else p).full_tensor()
                                - ref_params[n]).abs().max()) for n, p in model.named_parameters())
        res[str(ep_inside)] = r
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_rank_grid_hand_cases():
    from openmoe.parallel.mesh import rank_grid

    # world 8 = dp 2 x ep 4. ep inside: EP groups {0..3}, {4..7}; dp groups {0,4}, {1,5}, ...
    assert rank_grid(8, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # EP across nodes: dp groups {0,1}, {2,3}, ... (consecutive); EP groups {0,2,4,6}, {1,3,5,7}
    assert rank_grid(8, 4, ep_inside=False).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_ep_across_nodes_same_training_as_ep_inside(tmp_path):
    mp.spawn(_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    losses = {}
    for r in range(4):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        inside, across = res["True"], res["False"]
        # ep inside (ColossalAI's default): EP = consecutive ranks, dp strided
        assert inside["ep"] == [r // 2 * 2, r // 2 * 2 + 1] and inside["dp"] == [r % 2, r % 2 + 2], inside
        assert inside["coord"] == [r // 2, r % 2] and inside["ep_rank"] == r % 2
        # EP across nodes, ZeRO inside: dp = consecutive ranks, EP strided by dp = 2
        assert across["dp"] == [r // 2 * 2, r // 2 * 2 + 1] and across["ep"] == [r % 2, r % 2 + 2], across
        assert across["coord"] == [r % 2, r // 2] and across["ep_rank"] == r // 2
        for res_ in (inside, across):
            assert res_["loss"] < 1e-5 and res_["norm"] < 1e-5 and res_["param"] < 1e-5, res_
        losses[r] = (inside["losses"], across["losses"])
    a, b = losses[0]
    assert b == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_layout_and_train_config_name_the_mapping():
    from openmoe.planner.layout import Layout
    from openmoe.training.config import TrainConfig, key_help

    assert str(Layout(8, ep=4, ep_inside=False)) == ("world 8 = dp 2 x ep 4; EP strided across nodes, "
                                                     "dp groups consecutive ranks")
    assert str(Layout(8, ep=4)) == "world 8 = dp 2 x ep 4"
    assert TrainConfig().ep_inside is True
    assert any(k == "ep_inside" and "across nodes" in h for k, _, _, h in key_help())
