"""openmoe/moe/expert_types.py: each expert type inside MoELayer against an independent per-token
loop written here from the formulas (fp32), on both implementations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openmoe.moe import MLPExperts, MoELayer, ModuleExperts, SwiGLUExperts

H, I, E = 8, 12, 4


def _randomize(layer):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def _reference(layer, x_TH, expert_fn):
    """p = softmax(x W_r^T); top-k by argmax; y = sum_k p_k * expert_k(x) (no renorm, dropless)."""
    probs = torch.softmax(x_TH @ layer.gate_weight.t(), -1)
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        p = probs[t].clone()
        for _ in range(layer.top_k):
            e = int(p.argmax())
            out[t] += probs[t, e] * expert_fn(e, x_TH[t:t + 1])[0]
            p[e] = -1
    return out


def _swiglu(ex):
    return lambda e, x: (F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])) @ ex.w_down[e]


def _mlp(ex, act):
    return lambda e, x: act(x @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("k", [1, 2])
def test_swiglu_experts(impl, k):
    layer = _randomize(MoELayer(H, E, k, experts="swiglu", intermediate_size=I, experts_implementation=impl))
    assert isinstance(layer.experts, SwiGLUExperts)
    x = torch.randn(2, 5, H)
    y, out = layer(x)
    ref = _reference(layer, x.view(-1, H), _swiglu(layer.experts)).view_as(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert out.tokens_per_expert.sum() == 10 * k


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("act,fn", [("gelu", F.gelu), ("relu", F.relu), ("gelu_new", None)])
def test_mlp_experts_with_bias_and_activation(impl, act, fn):
    layer = _randomize(MoELayer(H, E, 2, experts="mlp", intermediate_size=I, activation=act,
                                experts_implementation=impl))
    assert isinstance(layer.experts, MLPExperts)
    if fn is None:  # GPT-2's tanh approximation, written out
        fn = lambda v: 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v ** 3)))
    x = torch.randn(7, H)
    y, _ = layer(x)
    torch.testing.assert_close(y, _reference(layer, x, _mlp(layer.experts, fn)), atol=1e-5, rtol=1e-5)


def test_mlp_experts_without_bias_have_no_bias_parameters():
    layer = MoELayer(H, E, 2, experts="mlp", intermediate_size=I, bias=False)
    assert sorted(n for n, _ in layer.experts.named_parameters()) == ["w_in", "w_out"]
    _randomize(layer)
    x = torch.randn(6, H)
    ex = layer.experts
    ref = _reference(layer, x, lambda e, v: F.gelu(v @ ex.w_in[e]) @ ex.w_out[e])
    torch.testing.assert_close(layer(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_expert_dropout_only_in_training():
    layer = _randomize(MoELayer(H, E, 2, experts="mlp", intermediate_size=I, dropout=0.5)).eval()
    x = torch.randn(6, H)
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    torch.manual_seed(1)
    a = layer(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, layer(x)[0])


class FFN(nn.Module):
    def __init__(self, act=torch.tanh):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_user_module_experts_and_gradients():
    layer = _randomize(MoELayer(H, E, 2, experts=FFN))
    assert isinstance(layer.experts, ModuleExperts) and len(layer.experts.experts) == E
    assert layer.experts.experts[0] is not layer.experts.experts[1]  # separate weights
    x = torch.randn(9, H, requires_grad=True)
    y, _ = layer(x)
    ref = _reference(layer, x, lambda e, v: layer.experts.experts[e](v))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    used = layer(x)[1].tokens_per_expert > 0
    for e in range(E):
        g = layer.experts.experts[e].fc1.weight.grad
        assert (g is not None and g.abs().sum() > 0) == bool(used[e])


def test_stacked_experts_match_module_experts_with_same_weights():
    """The grouped-GEMM MLP experts and a plain nn.Linear expert module are the same function."""
    stacked = _randomize(MoELayer(H, E, 2, experts="mlp", intermediate_size=I, activation="gelu"))
    mod = MoELayer(H, E, 2, experts=lambda: FFN(F.gelu))
    with torch.no_grad():
        mod.gate_weight.copy_(stacked.gate_weight)
        for e, m in enumerate(mod.experts.experts):
            m.fc1.weight.copy_(stacked.experts.w_in[e].t())
            m.fc1.bias.copy_(stacked.experts.b_in[e])
            m.fc2.weight.copy_(stacked.experts.w_out[e].t())
            m.fc2.bias.copy_(stacked.experts.b_out[e])
    x = torch.randn(3, 4, H)
    torch.testing.assert_close(stacked(x)[0], mod(x)[0], atol=1e-5, rtol=1e-5)


def test_bad_experts_arguments():
    with pytest.raises(ValueError, match="experts='moe'"):
        MoELayer(H, E, 2, experts="moe")
    with pytest.raises(ValueError, match="factory"):
        MoELayer(H, E, 2, experts=FFN())  # an instance, not a factory
    with pytest.raises(ValueError, match=r"Wide maps \[2, 8\] -> \[2, 16\]"):
        class Wide(nn.Module):
            def forward(self, x):
                return torch.cat([x, x], -1)

        MoELayer(H, E, 2, experts=Wide)
    with pytest.raises(ValueError, match="not an nn.Module"):
        MoELayer(H, E, 2, experts=lambda: 3)
    with pytest.raises(ValueError, match="activation 'swishy'"):
        MoELayer(H, E, 2, experts="mlp", activation="swishy")
    with pytest.raises(ValueError, match="implementation 'cuda'"):
        MoELayer(H, E, 2, experts="mlp", experts_implementation="cuda")


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_gated_experts_by_name_with_any_activation(impl):
    """experts="gated": SwiGLU's stacks with the layer's `activation` (here exact GELU: GeGLU)."""
    from openmoe.moe import GatedExperts

    layer = _randomize(MoELayer(H, E, 2, experts="gated", intermediate_size=I, activation="gelu",
                                experts_implementation=impl))
    assert isinstance(layer.experts, GatedExperts)
    ex = layer.experts
    x = torch.randn(7, H)
    y, _ = layer(x)
    ref = _reference(layer, x, lambda e, v: (F.gelu(v @ ex.w_gate[e]) * (v @ ex.w_up[e])) @ ex.w_down[e])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
