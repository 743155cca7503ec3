"""openmoe/training/adafactor.py: torch's Adafactor step for step on ordinary tensors; stacked
experts scaled and clipped per expert, as T5X treats the expert axis (checked against torch's
Adafactor run on each expert's slice alone); build_optimizer's groups."""

import types

import pytest
import torch

from openmoe.training.adafactor import Adafactor
from openmoe.training.optim import build_optimizer


def _steps(opt_a, opt_b, pa, pb, n=5, scale=None):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        for a, b in zip(pa, pb):
            grad = torch.randn(a.shape, generator=g) * (1 if scale is None else scale)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()


def test_equals_torch_adafactor_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,), (3, 4, 5)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}]  # noqa: E731
    o_ref = torch.optim.Adafactor(groups(ref), lr=1e-2, foreach=False)
    _steps(Adafactor(groups(ours), lr=1e-2), o_ref, ours, ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    opt = Adafactor(groups([torch.nn.Parameter(p.detach().clone()) for p in ours]), lr=1e-2)
    assert set(opt.state_dict()["param_groups"][0]) >= {"lr", "eps", "d", "beta2_decay", "per_expert"}


def test_per_expert_equals_torch_on_each_expert_alone():
    # experts of very different scales and gradients: with the whole stack's RMS, the small ones
    # would take the big ones' step size; per expert, each steps as if it were its own tensor
    E, H, I = 4, 6, 5
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(E, H, I) * torch.tensor([0.1, 1, 3, 10]).view(E, 1, 1))
    alone = [torch.nn.Parameter(w.detach()[e].clone()) for e in range(E)]
    ours = Adafactor([{"params": [w], "per_expert": True, "weight_decay": 0.1}], lr=0.5)
    refs = [torch.optim.Adafactor([{"params": [a], "weight_decay": 0.1}], lr=0.5, foreach=False) for a in alone]
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        grad = torch.randn(E, H, I, generator=g) * torch.tensor([5, 1, 0.01, 1]).view(E, 1, 1)
        w.grad = grad.clone()
        for e, a in enumerate(alone):
            a.grad = grad[e].clone()
        ours.step()
        for r in refs:
            r.step()
    for e in range(E):
        # the same formulas; rounding differs in the last bits (the scale is a tensor here, a
        # Python float in torch), so compare at 1e-6 of the expert's own size
        atol = 1e-6 * float(alone[e].abs().max())
        torch.testing.assert_close(w.detach()[e], alone[e].detach(), rtol=1e-5, atol=atol)
        torch.testing.assert_close(ours.state[w]["row_var"][e], refs[e].state[alone[e]]["row_var"], rtol=1e-4, atol=0)
    # and the whole-stack rule really differs here (the test can tell them apart)
    w2 = torch.nn.Parameter(torch.randn(E, H, I) * torch.tensor([0.1, 1, 3, 10]).view(E, 1, 1))
    w3 = torch.nn.Parameter(w2.detach().clone())
    _steps(Adafactor([{"params": [w2], "per_expert": True}], lr=0.5), Adafactor([{"params": [w3]}], lr=0.5),
           [w2], [w3], n=1)
    assert not torch.allclose(w2, w3, rtol=1e-3)


def test_per_expert_group_takes_stacks_only():
    with pytest.raises(ValueError, match="per_expert group holds stacked"):
        Adafactor([{"params": [torch.nn.Parameter(torch.zeros(3))], "per_expert": True}])


def test_build_optimizer_puts_expert_stacks_in_a_per_expert_group(tiny):
    from openmoe import OpenMoeForCausalLM

    m = OpenMoeForCausalLM(tiny())
    cfg = types.SimpleNamespace(optimizer="adafactor", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    opt = build_optimizer(m, cfg)
    names = {id(p): n for n, p in m.named_parameters()}
    per = [g for g in opt.param_groups if g["per_expert"]]
    assert len(per) == 1 and per[0]["weight_decay"] == 0.1
    assert sorted(names[id(p)] for p in per[0]["params"]) == sorted(
        n for n, p in m.named_parameters() if ".mlp.experts." in n)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    cfg.optimizer = "adamw"
    assert len(build_optimizer(m, cfg).param_groups) == 2
