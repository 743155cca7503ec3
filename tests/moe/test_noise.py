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
