"""openmoe/parallel/ddp.py and the expert layouts: the MoE layer inside a user's own network
under plain DistributedDataParallel with EP = 2 (gloo), against one process holding all
experts on the global batch; and the 'ep' / 'gather' / 'auto' layouts against each other."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    """A user's model: embed -> (norm -> shared MoE) x 2 -> head. The MoE is used twice (WideNet)."""

    def __init__(self, experts="mlp", capacity="dropless"):
        super().__init__()
        from openmoe.moe import MoELayer

        self.inp = nn.Linear(6, 8)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))
        self.moe = MoELayer(8, 4, 2, experts=experts, intermediate_size=16, capacity=capacity,
                            aux_loss=0.01, z_loss=0.001)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        h, aux = self.inp(x), 0.0
        for norm in self.norms:
            out, stats = self.moe(norm(h))
            h, aux = h + out, aux + stats.loss
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten()) + aux


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4, 5), generator=g)


def _reference(steps, capacity):
    """One process, all experts, global batch of 4 sequences; SGD."""
    torch.manual_seed(0)
    model = Net(capacity=capacity)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], None
    for step in range(steps):
        x, y = _data(step)
        # the mean over two half-batches, exactly what DDP's averaging computes
        loss = (model(x[:2], y[:2]) + model(x[2:], y[2:])) / 2
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _ddp_worker(rank, port, out, steps, capacity):
    sys.path.insert(0, os.path.dirname(HERE))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from openmoe.parallel import ddp_ignore_experts, expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same full model on every rank; experts are then sliced per rank
    net = Net(capacity=capacity)
    expert_parallel(net)
    ignored = ddp_ignore_experts(net)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], None
    for step in range(steps):
        x, y = _data(step)
        loss = model(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])
        loss.backward()
        if step == 0:
            grads = {n: p.grad.tolist() for n, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / 2)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"losses": losses, "grads": grads, "ignored": ignored}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("capacity", ["dropless", "colossalai"])
def test_ddp_with_expert_parallel_equals_one_process(tmp_path, capacity):
    steps = 3
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), steps, capacity), nprocs=2, join=True)
    ref_losses, ref_grads = _reference(steps, capacity)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert sorted(res[0]["ignored"]) == sorted(f"moe.experts.{n}" for n in ("w_in", "b_in", "w_out", "b_out"))
    for r in range(2):
        assert res[r]["losses"] == pytest.approx(ref_losses, rel=1e-5)
        for name, g in res[r]["grads"].items():
            ref = ref_grads[name]
            if ".experts." in name:  # rank r holds experts [2r, 2r + 2): not averaged across ranks
                ref = ref[2 * r:2 * r + 2]
            torch.testing.assert_close(torch.tensor(g), ref, atol=1e-6, rtol=1e-5, msg=f"{name} rank {r}")
    # the two ranks' expert gradients are different tensors (an all-reduce would make them equal)
    assert res[0]["grads"]["moe.experts.w_in"] != res[1]["grads"]["moe.experts.w_in"]


def _layout_worker(rank, port, out):
    sys.path.insert(0, os.path.dirname(HERE))
    import torch.distributed as dist

    from openmoe.parallel import expert_parallel, set_expert_layout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = expert_parallel(Net(experts="swiglu", capacity="t5x"))
    x, y = _data(0)
    x, y = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
    res = {}
    for layout in ("ep", "gather", "auto"):
        set_expert_layout(net, layout)
        net.zero_grad()
        loss = net(x, y)
        loss.backward()
        res[layout] = {"loss": loss.item(), "grads": {n: p.grad.tolist() for n, p in net.named_parameters()}}
    for _ in range(8):  # auto: two timed calls per layout per token count, then it decides
        net(x, y)
    disp = net.moe.dispatcher
    res["decided"] = sorted(set(disp.layout.decided.values()))

    # the trainer's path on the same user model: parallelize(model, state) + sync_gradients
    from openmoe.parallel import build_state, parallelize, sync_gradients

    torch.manual_seed(0)
    net2 = parallelize(Net(), build_state(2))
    net2(x, y).backward()
    sync_gradients(net2, build_state(2))
    res["parallelize_grads"] = {n: p.grad.tolist() for n, p in net2.named_parameters()}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_expert_layouts_give_equal_outputs_and_gradients(tmp_path):
    mp.spawn(_layout_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"{r}.json").read_text())
        ep = res["ep"]
        for layout in ("gather", "auto"):
            assert res[layout]["loss"] == pytest.approx(ep["loss"], rel=1e-6)
            for name, g in ep["grads"].items():
                torch.testing.assert_close(torch.tensor(res[layout]["grads"][name]), torch.tensor(g),
                                           atol=1e-6, rtol=1e-5, msg=f"{layout} {name}")
        assert len(res["decided"]) == 1 and res["decided"][0] in ("ep", "gather")
        _, ref = _reference(1, "dropless")
        for name, g in res["parallelize_grads"].items():
            want = ref[name][2 * r:2 * r + 2] if ".experts." in name else ref[name]
            torch.testing.assert_close(torch.tensor(g), want, atol=1e-6, rtol=1e-5, msg=name)


def test_gather_layout_needs_stacked_experts(tmp_path):
    from openmoe.parallel.expert_parallel import _stacked
    from openmoe.moe import MoELayer

    layer = MoELayer(8, 4, 2, experts=lambda: nn.Linear(8, 8))
    with pytest.raises(ValueError, match="'gather' expert layout needs stacked expert weights"):
        _stacked(layer.experts)
