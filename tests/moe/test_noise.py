"""openmoe/moe/noise.py: router noise is training-only, of the stated law, and reproducible."""

import pytest
import torch

from openmoe.moe import MoELayer, RouterNoise


def _layer(noise, E=4):
    layer = MoELayer(E, E, 2, noise=noise)
    with torch.no_grad():
        layer.gate_weight.copy_(torch.eye(E))  # logits = router input: the noise is visible as is
    return layer


def test_no_noise_in_eval():
    for kind in ("jitter", "gaussian"):
        layer = _layer(kind).eval()
        x = torch.randn(3, 4)
        assert torch.equal(layer.router_logits(x), x)


def test_jitter_multiplies_the_input_by_uniform_1_plus_minus_eps():
    layer = _layer(RouterNoise("jitter", 0.1)).train()
    x = torch.rand(4000, 4) + 0.5
    ratio = layer.router_logits(x) / x
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.min() < 0.905 and ratio.max() > 1.095  # the whole interval is used
    assert ratio.mean().item() == pytest.approx(1.0, abs=2e-3)


def test_gaussian_adds_normal_noise_of_std_one_over_e():
    layer = _layer("gaussian", E=4).train()
    x = torch.randn(20000, 4)
    d = layer.router_logits(x) - x
    assert d.mean().item() == pytest.approx(0.0, abs=0.01)
    assert d.std().item() == pytest.approx(1 / 4, rel=0.03)


@pytest.mark.parametrize("kind", ["jitter", "gaussian"])
def test_seeded_noise_is_reproducible_and_independent_of_the_global_rng(kind):
    x = torch.randn(5, 4)
    a, b = _layer(RouterNoise(kind, seed=3)).train(), _layer(RouterNoise(kind, seed=3)).train()
    seq_a = [a.router_logits(x) for _ in range(3)]
    torch.manual_seed(123)  # must not matter
    seq_b = [b.router_logits(x) for _ in range(3)]
    for u, v in zip(seq_a, seq_b):
        assert torch.equal(u, v)
    assert not torch.equal(seq_a[0], seq_a[1])  # fresh noise per call


def test_unseeded_noise_follows_torch_manual_seed():
    layer = _layer("gaussian").train()
    x = torch.randn(5, 4)
    torch.manual_seed(0)
    a = layer.router_logits(x)
    torch.manual_seed(0)
    assert torch.equal(a, layer.router_logits(x))


def test_bad_noise():
    with pytest.raises(ValueError, match="noise='uniform'"):
        RouterNoise("uniform")
    with pytest.raises(ValueError, match="scale"):
        RouterNoise("jitter", -0.1)


# ColossalAI's two generators, as their code runs: both act on the router *logits*.


def _logits_layer(noise, E=4):
    """A router whose logits are 2 * x (gate = 2 I): noise on the input and on the logits differ."""
    layer = MoELayer(E, E, 2, noise=noise)
    with torch.no_grad():
        layer.gate_weight.copy_(2 * torch.eye(E))
    return layer


def test_colossalai_normal_adds_std_one_over_e_squared_to_the_logits_hand_case():
    E = 4
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    layer = _logits_layer(RouterNoise("colossalai_normal", seed=5), E).train()
    # by hand: logits 2x = [2, -4, 1, 0]; noise = z / E^2 = z / 16 with z the generator's N(0, 1)
    z = torch.empty(1, E).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    expected = torch.tensor([[2.0, -4.0, 1.0, 0.0]]) + z / 16
    assert torch.allclose(layer.router_logits(x), expected, atol=1e-6)
    # the law, by its moments: mean 0, std 1/16 (gaussian's is 1/4)
    big = _logits_layer("colossalai_normal", E).train()
    xs = torch.randn(20000, E)
    d = big.router_logits(xs) - 2 * xs
    assert d.mean().item() == pytest.approx(0.0, abs=0.003)
    assert d.std().item() == pytest.approx(1 / 16, rel=0.03)


def test_colossalai_uniform_multiplies_the_logits_hand_case():
    E = 4
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    layer = _logits_layer(RouterNoise("colossalai_uniform", seed=9), E).train()
    # by hand: logits 2x = [2, -4, 1, 6], times u = 0.99 + 0.02 * U[0, 1) from the same generator
    u = torch.empty(1, E).uniform_(0.99, 1.01, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(layer.router_logits(x), torch.tensor([[2.0, -4.0, 1.0, 6.0]]) * u, atol=1e-6)
    # on the logits, not the input: with a bias-free 2I gate both agree, so check the ratio's range
    xs = torch.rand(4000, E) + 0.5
    ratio = _logits_layer("colossalai_uniform", E).train().router_logits(xs) / (2 * xs)
    assert ratio.min() >= 0.99 - 1e-6 and ratio.max() <= 1.01 + 1e-6
    assert ratio.min() < 0.9905 and ratio.max() > 1.0095


def test_colossalai_noise_acts_after_the_router_jitter_before():
    # input noise and logit noise differ once the router mixes the inputs: gate rows [1, 1]
    x = torch.tensor([[1.0, 1.0]])
    for kind, on_logits in (("jitter", False), ("colossalai_uniform", True)):
        layer = MoELayer(2, 2, 1, noise=RouterNoise(kind, 0.1, seed=0)).train()
        with torch.no_grad():
            layer.gate_weight.fill_(1.0)
        u = torch.empty(1, 2).uniform_(0.9, 1.1, generator=torch.Generator().manual_seed(0))
        expected = torch.full((1, 2), 2.0) * u if on_logits else (x * u).sum(1, keepdim=True).expand(1, 2)
        assert torch.allclose(layer.router_logits(x), expected, atol=1e-6), kind


@pytest.mark.parametrize("kind", ["colossalai_normal", "colossalai_uniform"])
def test_colossalai_noise_off_in_eval(kind):
    layer = _logits_layer(kind).eval()
    x = torch.randn(3, 4)
    assert torch.equal(layer.router_logits(x), 2 * x)
