"""openmoe/moe/layer.py: route -> dispatch -> experts -> combine against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from openmoe.moe import CapacityPolicy, MoELayer
from openmoe.moe.noise import RouterNoise


def _layer(policy, E=4, H=8, I=8, k=2):
    layer = MoELayer(H, E, k, experts="openmoe", intermediate_size=I, capacity=policy)
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
    layer.noise = RouterNoise("jitter", 0.1)
    x = torch.randn(1, 5, 8)
    assert torch.equal(layer.router_logits(x), layer.router_logits(x))  # eval: no noise
    layer.train()
    assert not torch.equal(layer.router_logits(x), layer.router_logits(x))


def test_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 4, 5)


# --- the general layer API -------------------------------------------------------------------

def _hand_layer(k, capacity):
    """H = E = 2, gate = identity: token x = [1, 0] prefers expert 0, [0, 1] expert 1. Experts are
    SwiGLU with weights chosen so expert e maps x to (e + 1) * something nonzero."""
    layer = MoELayer(2, 2, k, experts="swiglu", intermediate_size=2, capacity=capacity)
    with torch.no_grad():
        layer.gate_weight.copy_(torch.eye(2))
        layer.experts.w_gate.fill_(1.0)
        layer.experts.w_up.fill_(1.0)
        layer.experts.w_down[0].fill_(1.0)
        layer.experts.w_down[1].fill_(2.0)
    return layer.eval()


def test_top1_switch_drop_by_hand():
    """Top-1, ColossalAI rule: capacity = even(floor(1 * 0.5 * 8 / 2)) = 2. All 8 tokens prefer
    expert 0: tokens 0 and 1 (first in token order) are kept, 2..7 dropped (output 0); the
    combine weight is the raw top-1 probability (Switch, no renormalisation)."""
    layer = _hand_layer(1, CapacityPolicy("colossalai", 0.5, 0.5, min_capacity=0))
    x = torch.tensor([[1.0, 0.0]] * 8)
    y, out = layer(x)
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)[0]
    e0 = layer.experts.ffn(x[:1], lambda v, w, b=None: v @ getattr(layer.experts, w)[0])[0]
    torch.testing.assert_close(y[:2], (p0 * e0).expand(2, 2))
    assert (y[2:] == 0).all()
    assert out.tokens_per_expert.tolist() == [2, 0]
    assert out.dropped_fraction.item() == pytest.approx(6 / 8)


def test_top2_priority_by_hand():
    """Top-2, capacity even(floor(2 * 0.7 * 3 / 2)) = 2 per expert. Token 0 prefers e0 (then e1),
    tokens 1 and 2 prefer e1 (then e0). Queues fill with every top-1 first, in token order:
    e0 = [t0 top-1, t1 top-2, t2 top-2] -> t2's top-2 dropped; e1 = [t1 top-1, t2 top-1, t0 top-2]
    -> t0's top-2 dropped, although t0 comes first in token order."""
    layer = _hand_layer(2, CapacityPolicy("colossalai", 0.7, 0.7, min_capacity=0))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    r = layer.route(x.unsqueeze(0))
    assert r.capacity == 2
    assert r.expert_TK.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert r.keep_TK.tolist() == [[True, False], [True, True], [True, False]]
    y, out = layer(x)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # [p_hi, p_lo]
    ex = layer.experts

    def expert(e, v):
        return ex.ffn(v[None], lambda z, w, b=None: z @ getattr(ex, w)[e])[0]

    torch.testing.assert_close(y[0], p[0] * expert(0, x[0]))
    torch.testing.assert_close(y[1], p[0] * expert(1, x[1]) + p[1] * expert(0, x[1]))
    torch.testing.assert_close(y[2], p[0] * expert(1, x[2]))
    assert out.tokens_per_expert.tolist() == [2, 2]


def test_norm_topk_prob_makes_weights_sum_to_one():
    layer = _hand_layer(2, "dropless")
    layer.norm_topk_prob = True
    r = layer.route(torch.randn(1, 5, 2))
    torch.testing.assert_close(r.weight_TK.sum(-1), torch.ones(5))


def test_loss_coefficients_weight_the_losses():
    layer = MoELayer(8, 4, 2, experts="swiglu", intermediate_size=8, aux_loss=0.01, z_loss=0.001).train()
    _, out = layer(torch.randn(2, 6, 8))
    torch.testing.assert_close(out.loss, 0.01 * out.aux_loss + 0.001 * out.z_loss)
    assert MoELayer(8, 4, 2)(torch.randn(3, 8))[1].loss is None  # coefficients 0: nothing to add


def test_capacity_argument_forms():
    assert MoELayer(8, 4, 2).capacity.name == "dropless"
    assert MoELayer(8, 4, 2, capacity="t5x").capacity.name == "t5x"
    c = MoELayer(8, 4, 2, capacity=1.5).capacity
    assert (c.name, c.capacity_factor_train, c.capacity_factor_eval) == ("colossalai", 1.5, 1.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), "top_k=5"),
    (dict(top_k=0), "top_k=0"),
    (dict(capacity="fifo"), "capacity policy 'fifo'"),
    (dict(capacity=0.0), "capacity_factor_train"),
    (dict(noise="dropout"), "noise='dropout'"),
    (dict(aux_loss=-1.0), "aux_loss"),
])
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(8, 4, **kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[2, 3, 5\]"):
        MoELayer(8, 4, 2)(torch.randn(2, 3, 5))


def test_shared_layer_gradients_equal_the_sum_over_its_uses():
    """WideNet: one MoE layer used by two blocks (own norms). Its gradients must equal the sum
    of two independent copies' gradients on the same computation."""
    import copy

    torch.manual_seed(0)
    shared = MoELayer(8, 4, 2, experts="mlp", intermediate_size=16, aux_loss=0.01, z_loss=0.001).train()
    norms = [torch.nn.LayerNorm(8) for _ in range(2)]
    copies = [copy.deepcopy(shared) for _ in range(2)]
    x = torch.randn(2, 5, 8)

    def run(layers):
        h, aux = x, 0.0
        for norm, layer in zip(norms, layers):
            y, out = layer(norm(h))
            h, aux = h + y, aux + out.loss
        return (h ** 2).mean() + aux

    run([shared, shared]).backward()
    run(copies).backward()
    for (name, p), p0, p1 in zip(shared.named_parameters(), copies[0].parameters(), copies[1].parameters()):
        torch.testing.assert_close(p.grad, p0.grad + p1.grad, msg=name)
        assert p0.grad.abs().sum() > 0 and p1.grad.abs().sum() > 0
