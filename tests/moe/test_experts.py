"""openmoe/moe/experts.py: the grouped-GEMM backend equals the per-expert loop and a hand formula."""

import pytest
import torch

from openmoe.moe.experts import EXPERT_BACKENDS, OpenMoeExperts, register_expert_backend


def _experts(E=4, H=8, I=8, dtype=torch.float32):
    m = OpenMoeExperts(E, H, I)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.to(dtype)


def _run(m, impl, x, counts, g):
    m.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    m.implementation = impl
    y = m(x, counts)
    (y.float() * g).sum().backward()
    return y.detach().float(), x.grad.float(), [p.grad.float().clone() for p in m.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_equals_loop_forward_backward(dtype, tol):
    m = _experts(dtype=dtype)
    counts = torch.tensor([3, 0, 5, 2])  # an empty expert in the middle
    x = torch.randn(10, 8).to(dtype)
    g = torch.randn(10, 8)
    ya, gxa, gwa = _run(m, "grouped_mm", x, counts, g)
    yb, gxb, gwb = _run(m, "eager", x, counts, g)
    scale = yb.abs().max()
    assert (ya - yb).abs().max() <= tol * scale
    assert (gxa - gxb).abs().max() <= tol * gxb.abs().max()
    for a, b in zip(gwa, gwb):
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert gwa[0][1].abs().sum() == 0  # expert 1 saw no token: no gradient


def test_expert_is_the_three_way_gated_mlp():
    m = _experts(E=2, H=4, I=4)
    x = torch.randn(5, 4)
    counts = torch.tensor([2, 3])
    y = m(x, counts)
    # Hand formula, row by row: a, b = split(x @ wi_gate); (a * silu(b) * (x @ wi_up)) @ wo
    for t in range(5):
        e = 0 if t < 2 else 1
        gate = x[t] @ m.wi_gate[e]
        a, b = gate[:4], gate[4:]
        ref = (a * (b * torch.sigmoid(b)) * (x[t] @ m.wi_up[e])) @ m.wo[e]
        assert torch.allclose(y[t], ref, atol=1e-5)


def test_backend_registry_accepts_new_backend_and_rejects_unknown():
    m = _experts()
    calls = []

    def mine(mod, x, counts):
        calls.append(int(counts.sum()))
        return EXPERT_BACKENDS["eager"](mod, x, counts)

    register_expert_backend("test_mine", mine)
    try:
        m.implementation = "test_mine"
        m(torch.randn(4, 8), torch.tensor([1, 1, 1, 1]))
        assert calls == [4]
    finally:
        EXPERT_BACKENDS.pop("test_mine")
    m.implementation = "nope"
    with pytest.raises(ValueError, match="nope"):
        m(torch.randn(4, 8), torch.tensor([1, 1, 1, 1]))


def test_no_tokens_at_all():
    m = _experts()
    y = m(torch.randn(0, 8), torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 8)


def test_misaligned_shapes_use_the_loop_with_the_same_result():
    from openmoe.moe.experts import grouped_mm_available

    m = _experts(H=8, I=6)  # 6 fp32 = 24 bytes: not 16-byte aligned for grouped_mm
    assert not grouped_mm_available(torch.randn(2, 8), m.wi_gate, m.wi_up, m.wo)
    x, counts = torch.randn(5, 8), torch.tensor([1, 1, 1, 2])
    m.implementation = "grouped_mm"
    y1 = m(x, counts)
    m.implementation = "eager"
    assert torch.equal(y1, m(x, counts))


def test_autocast_runs_grouped_mm_in_bf16_and_router_in_fp32():
    from openmoe.moe import CapacityPolicy, MoELayer

    layer = MoELayer(8, 4, 2, experts="openmoe", intermediate_size=8, capacity=CapacityPolicy("dropless"))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 6, 8)
    ref = x @ layer.gate_weight.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        y = layer.experts(torch.randn(5, 8), torch.tensor([1, 1, 1, 2]))
    assert logits.dtype == torch.float32 and torch.equal(logits, ref)  # not rounded through bf16
    assert y.dtype == torch.bfloat16  # the experts follow autocast, not the fp32 master weights


def test_loop_mm_values_and_gradients_with_an_empty_expert():
    """experts.loop_mm (the per-expert reference matmul, hand-written backward) against plain
    per-block matmuls, expert 1 getting no rows (its weight gradient must be exactly 0)."""
    from openmoe.moe.experts import loop_mm

    torch.manual_seed(0)
    counts = [3, 0, 2, 4]
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.cat([x[0:3] @ w[0], x[3:5] @ w[2], x[5:9] @ w[3]])
    torch.testing.assert_close(loop_mm(x, w, counts), ref)
    assert torch.autograd.gradcheck(lambda a, b: loop_mm(a, b, counts), (x, w))
    loop_mm(x, w, counts).sum().backward()
    assert (w.grad[1] == 0).all() and w.grad[0].abs().sum() > 0
