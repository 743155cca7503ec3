"""openmoe/moe/dispatch.py: the plan's static layout (kept rows sorted by expert, dropped rows
last) and the masks that keep dropped rows out of the output and the input gradient."""

import torch

from openmoe.moe import CapacityPolicy, LocalDispatcher, MoELayer
from openmoe.moe.experts import EXPERT_BACKENDS, experts_grouped_mm
from openmoe.moe.router import Routing


def _routing(expert_TK, keep_TK, capacity):
    T, E = expert_TK.shape[0], int(expert_TK.max()) + 1
    return Routing(expert_TK=expert_TK, weight_TK=torch.rand(T, 2) * keep_TK, keep_TK=keep_TK,
                   logits_TE=torch.zeros(T, E), probs_TE=torch.zeros(T, E),
                   group_T=torch.zeros(T, dtype=torch.long), num_groups=1, capacity=capacity,
                   aux_loss=None, z_loss=None)


def test_plan_by_hand():
    # 3 tokens, top-2, capacity 2; assignment (t=1, k=0) to expert 0 is dropped... as the hand
    # case: slots t*K+k = [[0, 1], [2, 3], [4, 5]] choose experts [[2, 0], [0, 1], [2, 1]]
    expert_TK = torch.tensor([[2, 0], [0, 1], [2, 1]])
    keep_TK = torch.tensor([[True, True], [True, False], [True, True]])
    plan = LocalDispatcher().plan(_routing(expert_TK, keep_TK, capacity=2), 3)
    # expert 0 <- slots 1, 2; expert 1 <- slot 5; expert 2 <- slots 0, 4; dropped: slot 3 (last)
    assert plan.slot_N.tolist() == [1, 2, 5, 0, 4, 3]
    assert plan.token_N.tolist() == [0, 1, 2, 0, 2, 1]
    assert plan.counts_E.tolist() == [2, 1, 2]
    assert plan.kept_N.tolist() == [True, True, True, True, True, False]
    assert plan.row_S.tolist() == [3, 0, 1, 5, 4, 2]  # slot s is row row_S[s]


def test_plan_keeps_only_the_rows_capacity_can_keep():
    # capacity 1 x 3 experts x 1 group: at most 3 of the 6 assignments survive -> 3 rows
    expert_TK = torch.tensor([[2, 0], [0, 1], [2, 1]])
    keep_TK = torch.tensor([[True, True], [False, True], [False, False]])
    plan = LocalDispatcher().plan(_routing(expert_TK, keep_TK, capacity=1), 3)
    assert plan.slot_N.tolist() == [1, 3, 0]  # experts 0, 1, 2; the dropped slots get no row
    assert plan.counts_E.tolist() == [1, 1, 1]
    y = torch.tensor([[10.0], [20.0], [30.0]])  # rows' outputs: expert 0, 1, 2
    out = LocalDispatcher().combine(y, plan, torch.float32)
    expected = [plan.weight_S[0] * 30 + plan.weight_S[1] * 10, plan.weight_S[3] * 20, 0.0]
    torch.testing.assert_close(out[:, 0], torch.stack([torch.as_tensor(v) for v in expected]).float())


class _NaNTail(torch.autograd.Function):
    """Poison what a kernel leaves unwritten: output rows past the experts' rows, and the
    gradient flowing back into them."""

    @staticmethod
    def forward(ctx, y, n):
        ctx.n = n
        y = y.clone()
        y[n:] = float("nan")
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.n:] = float("nan")
        return g, None


def test_unwritten_rows_of_dropped_assignments_never_reach_output_or_gradient():
    def poisoned(experts, x_NH, counts_E):
        return _NaNTail.apply(experts_grouped_mm(experts, x_NH, counts_E), int(counts_E.sum()))

    EXPERT_BACKENDS["nan_tail"] = poisoned
    try:
        results = []
        for impl in ("grouped_mm", "nan_tail"):
            torch.manual_seed(0)
            layer = MoELayer(16, 4, 2, experts="openmoe", intermediate_size=16, capacity=CapacityPolicy("t5x"),
                             experts_implementation=impl).train()
            x = torch.randn(1, 32, 16, requires_grad=True)
            y, out = layer(x)
            y.square().sum().backward()
            assert out.dropped_fraction > 0
            results.append((y.detach(), x.grad, layer.experts.wi_gate.grad))
    finally:
        del EXPERT_BACKENDS["nan_tail"]
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


def test_poisoned_rows_never_reach_the_biases_of_mlp_experts(monkeypatch):
    """Stacked experts with biases (experts='mlp'): each grouped GEMM's unwritten rows poisoned,
    forward and backward; output, input gradient and every weight and bias gradient stay equal
    to the unpoisoned run's (a dropped row's gradient once leaked into the last expert's bias)."""
    import openmoe.moe.expert_types as ET

    real = ET.grouped_mm

    def poisoned(x, w, offs):
        return _NaNTail.apply(real(x, w, offs), int(offs[-1]))

    results = []
    for fn in (real, poisoned):
        monkeypatch.setattr(ET, "grouped_mm", fn)
        torch.manual_seed(0)
        layer = MoELayer(16, 4, 2, experts="mlp", intermediate_size=16, capacity=CapacityPolicy("t5x"),
                         bias=True, experts_implementation="grouped_mm").train()
        x = torch.randn(1, 32, 16, requires_grad=True)
        y, out = layer(x)
        y.square().sum().backward()
        assert out.dropped_fraction > 0
        results.append([y.detach(), x.grad] + [p.grad for p in layer.experts.parameters()])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)
