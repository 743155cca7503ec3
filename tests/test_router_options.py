"""OpenMoeConfig's training-only router options (router_noise, router_second_expert): validated
with the field named, mapped from ColossalAI's router_noisy_policy, and reaching every MoE layer."""

import pytest

from openmoe import OpenMoeConfig, OpenMoeForCausalLM


def _moe_layers(model):
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


def test_defaults_are_the_originals():
    cfg = OpenMoeConfig()
    assert cfg.router_noise is None and cfg.router_second_expert == "all"


def test_options_reach_the_layers(tiny):
    model = OpenMoeForCausalLM(tiny(router_noise="colossalai_uniform", router_second_expert="random",
                                    router_second_threshold=0.5))
    layers = _moe_layers(model)
    assert layers and all(m.noise.kind == "colossalai_uniform" and m.second_expert == "random"
                          and m.second_threshold == 0.5 for m in layers)
    jitter = _moe_layers(OpenMoeForCausalLM(tiny(router_jitter_noise=0.02)))[0].noise
    assert (jitter.kind, jitter.scale) == ("jitter", 0.02)


@pytest.mark.parametrize("overrides,match", [
    ({"router_noise": "uniform"}, "OpenMoeConfig.router_noise='uniform': choose null or one of"),
    ({"router_noise": "gaussian", "router_jitter_noise": 0.01}, "router_noise='gaussian': give router_noise or"),
    ({"router_second_expert": "sample"}, "OpenMoeConfig.router_second_expert='sample'"),
    ({"router_second_expert": "random", "num_experts_per_tok": 1}, "'random' is a top-2 rule"),
    ({"router_second_threshold": 0}, "OpenMoeConfig.router_second_threshold=0: must be a positive"),
])
def test_bad_options_name_the_field(tiny, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


@pytest.mark.parametrize("theirs,ours", [("Jitter", "colossalai_uniform"), ("Gaussian", "colossalai_normal"),
                                         (None, None)])
def test_colossalai_router_noisy_policy_maps_to_their_generators(theirs, ours):
    cfg = OpenMoeConfig(model_type="llama", router_topk=2, router_noisy_policy=theirs)
    assert cfg.router_noise == ours
    with pytest.raises(ValueError, match="router_noisy_policy='Uniform'"):
        OpenMoeConfig(model_type="llama", router_topk=2, router_noisy_policy="Uniform")
