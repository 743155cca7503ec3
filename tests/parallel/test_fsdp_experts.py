"""Hierarchical expert sharding (openmoe/parallel/fsdp.py): at 4 ranks = dp 2 x ep 2 with 6
experts (3 per EP rank: uneven over dp 2), each rank holds its dp chunk of its EP block; the
loss, every gradient (experts: sum over dp replicas / world), the clipped norm and the weights
after AdamW steps equal one process; a DCP checkpoint holds global [E, ...] expert tensors and
loads back into the same layout and into experts replicated over dp; the balancer moves
sharded experts with their optimizer state."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank, world, ep, port, out_dir, steps):
    sys.path.insert(0, os.path.dirname(HERE))
    import copy
    from pathlib import Path

    import torch.distributed as dist

    from helpers import compare_and_step, join_gloo, seeded_twins, tiny_config
    from openmoe.parallel import build_state, is_expert, parallelize, sync_gradients
    from openmoe.parallel.balance import ExpertBalancer
    from openmoe.parallel.fsdp import global_expert
    from openmoe.training import checkpoint as ckpt

    join_gloo(rank, port, world)
    ps = build_state(ep)
    E = 6
    cfg = tiny_config(capacity_policy="dropless", num_experts=E)
    ref, model = seeded_twins(cfg, ps, fsdp=True)
    g = torch.Generator().manual_seed(123)
    batches = [torch.randint(2, cfg.vocab_size, (2, 12), generator=g) for _ in range(world)]
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_params = dict(ref.named_parameters())
    El, d = E // ep, rank // ep
    res = {"loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0, "layout": [], "n_experts": 0}

    def full(name, p):  # the global tensor of a (sharded) parameter or gradient
        if ".mlp.experts." in name:
            return global_expert(p, ps).full_tensor()
        return p.full_tensor()

    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            res["n_experts"] += 1
            rows = [2, 1][d]  # torch.chunk of 3 rows over dp 2
            res["layout"].append([is_expert(p), hasattr(p, "to_local"), p.device_mesh.mesh.tolist(),
                                  list(p.shape), p.to_local().numel() == rows * p[0].numel()])
    for _ in range(steps):
        ref_loss = sum(ref(b, labels=b).loss for b in batches) / world
        ref_loss.backward()
        out = model(batches[rank], labels=batches[rank])
        out.loss.backward()
        sync_gradients(model, ps)  # must leave the DTensor (FSDP-reduced) gradients alone
        for n, p in model.named_parameters():
            res["grad"] = max(res["grad"], float((full(n, p.grad) - ref_params[n].grad).abs().max()))
        compare_and_step(res, ref, opt_ref, ref_loss, model, opt, out.loss, ps)
    for n, p in model.named_parameters():
        res["param"] = max(res["param"], float((full(n, p) - ref_params[n]).abs().max()))

    # checkpoint: save, scramble, load back (same layout); load into experts replicated over dp
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = Path(out_dir) / "ckpt"
    path = ckpt.save(root, 1, model, opt, sched, {}, 2, ps)
    name = "model.layers.1.mlp.experts.wo"
    saved = {k: full(k, v).clone() for k, v in model.named_parameters()}
    saved_m = global_expert(opt.state[dict(model.named_parameters())[name]]["exp_avg"], ps).full_tensor()
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)
        for st in opt.state.values():
            st["exp_avg"].to_local().zero_()
    ckpt.load(path, model, opt, sched, ps)
    res["reload"] = max(float((full(k, v) - saved[k]).abs().max()) for k, v in model.named_parameters())
    p = dict(model.named_parameters())[name]
    res["reload_m"] = float((global_expert(opt.state[p]["exp_avg"], ps).full_tensor() - saved_m).abs().max())
    plain = parallelize(copy.deepcopy(ref), ps, fsdp=True, fsdp_experts=False)
    opt2 = torch.optim.AdamW(plain.parameters(), lr=1e-2, foreach=False)
    ckpt.load(path, plain, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0), ps)
    e = rank % ep
    p2 = dict(plain.named_parameters())[name]
    res["cross"] = max(float((p2 - saved[name][e * El:(e + 1) * El]).abs().max()),
                       float((opt2.state[p2]["exp_avg"] - saved_m[e * El:(e + 1) * El]).abs().max()))
    res["plain_is_dtensor"] = hasattr(p2, "to_local")

    # the balancer on sharded experts: swap two experts between the EP ranks
    bal = ExpertBalancer(model, opt, ps, every=1)
    layer = bal.layers[0]
    before = global_expert(layer.experts.wo, ps).full_tensor().clone()
    m_before = global_expert(opt.state[layer.experts.wo]["exp_avg"], ps).full_tensor().clone()
    new = [3, 1, 2, 0, 4, 5]  # expert 0 <-> expert 3 (slot 0 on EP rank 0, slot 3 on EP rank 1)
    bal._move(layer, list(range(E)), new)
    after = global_expert(layer.experts.wo, ps).full_tensor()
    m_after = global_expert(opt.state[layer.experts.wo]["exp_avg"], ps).full_tensor()
    res["moved"] = float(max((after[new] - before).abs().max(), (m_after[new] - m_before).abs().max()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_experts_sharded_over_dp_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(4, 2, free_port(), str(tmp_path), 2), nprocs=4, join=True)
    for r in range(4):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        print(r, res)
        assert res["n_experts"] == 6  # MoE layers 1 and 3: wi_gate, wi_up, wo each
        dp_ranks = [[r % 2, r % 2 + 2]]  # the dp replicas of this rank's EP block
        for is_exp, is_dt, mesh, shape, numel_ok in res["layout"]:
            assert is_exp and is_dt and mesh == dp_ranks[0] and shape[0] == 3 and numel_ok, res["layout"]
        assert res["loss"] < 1e-5, res
        assert res["grad"] < 1e-6, res
        assert res["norm"] < 1e-5, res
        assert res["param"] < 1e-5, res
        assert res["reload"] == 0 and res["reload_m"] == 0, res
        assert res["cross"] == 0 and not res["plain_is_dtensor"], res
        assert res["moved"] == 0, res
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(tmp_path / "ckpt" / "step_00000001")).read_metadata().state_dict_metadata
    assert tuple(meta["model.model.layers.1.mlp.experts.wi_gate"].size)[0] == 6  # global [E, ...]
    assert tuple(meta["optim.model.layers.1.mlp.experts.wo.exp_avg"].size)[0] == 6


def test_fsdp_units_are_the_no_split_blocks(tiny):
    """FSDP2's per-block units come from the model's _no_split_modules classes (outermost ones),
    not from an attribute path; a model naming none is refused with the reason."""
    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel.fsdp import block_modules

    model = OpenMoeForCausalLM(tiny())
    assert block_modules(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="_no_split_modules"):
        block_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
