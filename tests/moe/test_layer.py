"""openmoe/moe/layer.py: route -> dispatch -> experts -> combine against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from openmoe.moe import CapacityPolicy, MoELayer


def _layer(policy, E=4, H=8, I=8, k=2):
    layer = MoELayer(H, I, E, k, capacity=policy)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer.eval()


def _expert(layer, e, x):
    g = x @ layer.experts.wi_gate[e]
    a, b = g.chunk(2, -1)
    return (a * F.silu(b) * (x @ layer.experts.wi_up[e])) @ layer.experts.wo[e]


def _per_token_reference(layer, x_TH, keep_TK=None):
    """Straight from the reference: p = softmax(x W_r^T) in fp32; top-2 by argmax; output
    = sum over kept choices of p_e * expert_e(x)."""
    probs = torch.softmax(x_TH.float() @ layer.gate_weight.float().t(), -1)
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        p = probs[t].clone()
        for k in range(layer.top_k):
            e = int(p.argmax())
            if keep_TK is None or keep_TK[t, k]:
                out[t] += probs[t, e] * _expert(layer, e, x_TH[t])
            p[e] = -1
    return out


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_dropless_layer_equals_per_token_loop(impl):
    layer = _layer(CapacityPolicy("dropless"))
    layer.experts.implementation = impl
    x = torch.randn(2, 7, 8)
    y, stats = layer(x)
    ref = _per_token_reference(layer, x.reshape(-1, 8)).view(2, 7, 8)
    assert torch.allclose(y, ref, atol=1e-5)
    assert stats.tokens_per_expert.sum() == 28 and stats.dropped_fraction.item() == 0


def test_dropped_assignments_contribute_nothing():
    layer = _layer(CapacityPolicy("t5x", capacity_factor_eval=0.5, min_capacity=0))
    x = torch.randn(1, 16, 8)
    y, stats = layer(x)
    r = layer.route(x)
    assert not r.keep_TK.all()  # the case really drops
    ref = _per_token_reference(layer, x[0], r.keep_TK)
    assert torch.allclose(y[0], ref, atol=1e-5)
    dropped_tokens = ~r.keep_TK.any(1)
    assert (y[0][dropped_tokens] == 0).all()
    assert stats.dropped_fraction.item() == pytest.approx(1 - r.keep_TK.float().mean().item())
    assert stats.tokens_per_expert.tolist() == torch.bincount(r.expert_TK[r.keep_TK], minlength=4).tolist()


def test_2d_input_and_gradients_flow():
    layer = _layer(CapacityPolicy("dropless")).train()
    x = torch.randn(6, 8, requires_grad=True)
    y, stats = layer(x)
    (y.sum() + stats.aux_loss + stats.z_loss).backward()
    assert y.shape == (6, 8)
    assert x.grad.abs().sum() > 0 and layer.gate_weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    layer = _layer(CapacityPolicy("dropless"))
    layer.jitter_noise = 0.1
    x = torch.randn(1, 5, 8)
    assert torch.equal(layer.router_logits(x), layer.router_logits(x))  # eval: no noise
    layer.train()
    assert not torch.equal(layer.router_logits(x), layer.router_logits(x))


def test_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 6, 4, 5)
