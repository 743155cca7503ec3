"""openmoe/parallel: EP=2 and EP=2 x DP=2 on gloo equal one process on the same global batch
(loss, every gradient, clipped norm, parameters after optimizer steps), for t5x (with drops)
and dropless routing; the expert-gradient scale is checked to the exact reduction."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank, world, ep, policy, port, out_dir, steps):
    sys.path.insert(0, os.path.dirname(HERE))
    import copy

    import torch.distributed as dist

    from helpers import compare_and_step, tiny_config
    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel import build_state, is_expert, parallelize, sync_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps = build_state(ep)
    torch.manual_seed(0)
    cfg = tiny_config(capacity_policy=policy, capacity_factor_train=0.5, num_experts=4)
    ref = OpenMoeForCausalLM(cfg).train()
    model = copy.deepcopy(ref)
    if rank > 0:
        with torch.no_grad():  # other ranks start different: parallelize broadcasts rank 0's
            for p in model.parameters():
                p.add_(0.1)
    model = parallelize(model, ps)
    g = torch.Generator().manual_seed(123)
    batches = [torch.randint(2, cfg.vocab_size, (2, 12), generator=g) for _ in range(world)]
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ep_rank = rank % ep
    El = cfg.num_experts // ep
    ref_params = dict(ref.named_parameters())
    res = {"loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0, "wrong_ddp_expert": 0.0, "dropped": 0.0}

    def local_view(name, t):
        return t[ep_rank * El:(ep_rank + 1) * El] if ".mlp.experts." in name and ep > 1 else t

    for _ in range(steps):
        ref_out = [ref(b, labels=b) for b in batches]
        ref_loss = sum(o.loss for o in ref_out) / world
        ref_loss.backward()
        res["dropped"] = max(res["dropped"], float(ref_out[0].dropped_fraction.max()))
        out = model(batches[rank], labels=batches[rank])
        out.loss.backward()
        raw_expert = {n: p.grad.clone() for n, p in model.named_parameters() if is_expert(p)}
        sync_gradients(model, ps)
        for n, p in model.named_parameters():
            res["grad"] = max(res["grad"], float((p.grad - local_view(n, ref_params[n].grad)).abs().max()))
        # What DDP would do to an expert (average over every rank) is off by a factor: must differ.
        for n, gr in raw_expert.items():
            wrong = gr.clone()
            dist.all_reduce(wrong, group=ps.world_group)
            wrong /= world
            res["wrong_ddp_expert"] = max(res["wrong_ddp_expert"],
                                          float((wrong - local_view(n, ref_params[n].grad)).abs().max()))
        compare_and_step(res, ref, opt_ref, ref_loss, model, opt, out.loss, ps)
    for n, p in model.named_parameters():
        res["param"] = max(res["param"], float((p - local_view(n, ref_params[n])).abs().max()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world,ep,policy", [(2, 2, "t5x"), (4, 2, "dropless")])
def test_expert_parallel_equals_one_process(tmp_path, world, ep, policy):
    mp.spawn(_worker, args=(world, ep, policy, free_port(), str(tmp_path), 3), nprocs=world, join=True)
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        print(r, res)
        assert res["loss"] < 1e-5, res
        assert res["grad"] < 1e-6, res
        assert res["norm"] < 1e-5, res
        assert res["param"] < 1e-5, res
        assert res["wrong_ddp_expert"] > 100 * max(res["grad"], 1e-9), res  # the test can tell
        if policy == "t5x":
            assert res["dropped"] > 0  # capacity really drops tokens in this case
