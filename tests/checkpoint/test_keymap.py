"""The T5X <-> HF key map: a round trip over every model parameter, the reference table's
ops, and the shapes it implies, checked against the model itself."""

import pytest
import torch
from conftest import tiny_config
from t5x_fixture import t5x_shapes

from openmoe import OpenMoeConfig, OpenMoeForCausalLM
from openmoe.checkpoint import keymap
from openmoe.checkpoint.keymap import COPY, TRANSPOSE, to_hf, to_t5x


def _meta_model(cfg):
    with torch.device("meta"):
        return OpenMoeForCausalLM(cfg)


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(moe_layer_interval=1), OpenMoeConfig()],
                         ids=["tiny", "all-moe", "base"])
def test_round_trip_hf_t5x_hf_covers_the_model(cfg):
    params = dict(_meta_model(cfg).named_parameters())
    t5x = {}
    for hf_name, p in params.items():
        t5x_name, op = to_t5x(hf_name)
        assert to_hf(t5x_name) == (hf_name, op)  # HF -> T5X -> HF
        t5x[t5x_name] = keymap.t5x_shape(tuple(p.shape), op)
        assert keymap.hf_shape(t5x[t5x_name], op) == tuple(p.shape)
    assert t5x == t5x_shapes(cfg)  # exactly the reference's tree, shapes included


def test_reference_table_ops():
    # docs/openmoe-numerics.md section 5, row by row
    assert to_hf("token_embedder/embedding") == ("model.embed_tokens.weight", COPY)
    assert to_hf("decoder/layers_7/self_attention/query/kernel") == ("model.layers.7.self_attn.q_proj.weight", TRANSPOSE)
    assert to_hf("decoder/layers_7/self_attention/out/kernel") == ("model.layers.7.self_attn.o_proj.weight", TRANSPOSE)
    assert to_hf("decoder/layers_3/pre_mlp_layer_norm/scale") == ("model.layers.3.post_attention_layernorm.weight", COPY)
    assert to_hf("decoder/layers_0/mlp/wi_0/kernel") == ("model.layers.0.mlp.gate_proj.weight", TRANSPOSE)
    assert to_hf("decoder/layers_0/mlp/wo/kernel") == ("model.layers.0.mlp.down_proj.weight", TRANSPOSE)
    assert to_hf("decoder/layers_11/mlp/router/router_weights/w/kernel") == ("model.layers.11.mlp.gate_weight", TRANSPOSE)
    assert to_hf("decoder/layers_11/mlp/expert/wi_0/kernel") == ("model.layers.11.mlp.experts.wi_gate", COPY)
    assert to_hf("decoder/layers_11/mlp/expert/wi_1/kernel") == ("model.layers.11.mlp.experts.wi_up", COPY)
    assert to_hf("decoder/layers_11/mlp/expert/wo/kernel") == ("model.layers.11.mlp.experts.wo", COPY)
    assert to_hf("decoder/layers_11/extra_mlp/wi_1/kernel") == ("model.layers.11.extra_mlp.up_proj.weight", TRANSPOSE)
    assert to_hf("decoder/layers_11/pre_extra_mlp_layer_norm/scale") == \
        ("model.layers.11.pre_extra_mlp_layernorm.weight", COPY)
    assert to_hf("decoder/decoder_norm/scale") == ("model.norm.weight", COPY)
    assert to_hf("decoder/logits_dense/kernel") == ("lm_head.weight", TRANSPOSE)


@pytest.mark.parametrize("name", ["decoder/layers_0/self_attention/relpos/kernel", "encoder/layers_0/mlp/wo/kernel",
                                  "decoder/layers_x/mlp/wo/kernel", "token_embedder/embedding/extra",
                                  "model.layers.0.mlp.gate_weight.x"])
def test_unknown_names_map_to_nothing(name):
    assert to_hf(name) is None and to_t5x(name) is None


def test_table_is_one_to_one():
    assert len({r.hf for r in keymap.RULES}) == len({r.t5x for r in keymap.RULES}) == len(keymap.RULES)
    assert all(r.op in (COPY, TRANSPOSE) for r in keymap.RULES)
