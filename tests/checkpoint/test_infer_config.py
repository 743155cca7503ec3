"""Config from shapes: tiny and shipped sizes inferred, the non-shape facts of the shipped
configs kept, explicit configs checked with every mismatch named."""

from pathlib import Path

import pytest
from conftest import tiny_config
from t5x_fixture import t5x_shapes

from openmoe.checkpoint import CheckpointError
from openmoe.checkpoint.infer_config import (config_fields, config_problems, format_problems, infer_config,
                                             load_config)

FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "num_experts", "moe_layer_interval")


def _files(shapes):
    return {n: Path("ckpt") / n for n in shapes}


def test_infers_tiny_with_head_dim():
    cfg = tiny_config()
    got, how = infer_config(t5x_shapes(cfg), "ckpt", head_dim=16)
    assert {f: getattr(got, f) for f in FIELDS} == {f: getattr(cfg, f) for f in FIELDS}
    assert "inferred" in how
    # head_dim is not in the shapes: 4 x 16 reads as 1 x 64 without it
    assert infer_config(t5x_shapes(cfg), "ckpt")[0].num_attention_heads == 1


@pytest.mark.parametrize("name", ["base", "8b", "34b"])
def test_shipped_sizes_are_recognised_with_their_non_shape_facts(name):
    known = load_config(name)
    got, how = infer_config(t5x_shapes(known), "ckpt")
    assert how == f"shapes match configs/{name}"
    assert got.to_dict() == known.to_dict()  # router group size, z-loss, positions included
    assert config_problems(got, t5x_shapes(known), _files(t5x_shapes(known)), "ckpt") == []


def test_34b_differs_from_base_beyond_shapes():
    cfg = infer_config(t5x_shapes(load_config("34b")), "ckpt")[0]
    assert (cfg.router_group_size, cfg.router_z_loss_coef, cfg.head_dim) == (8192, 1e-3, 128)


def test_wrong_config_names_every_field():
    shapes = t5x_shapes(tiny_config())
    wrong = tiny_config(hidden_size=48, num_hidden_layers=6, num_experts=8)
    problems = config_problems(wrong, shapes, _files(shapes), "ckpt")
    assert problems[:3] == ["hidden_size: config 48, checkpoint 32", "num_hidden_layers: config 6, checkpoint 4",
                            "num_experts: config 8, checkpoint 4"]
    assert any(p.startswith("missing parameter decoder/layers_5/") for p in problems)
    line = format_problems(problems)
    assert "\n" not in line and line.startswith(f"{len(problems)} mismatches: hidden_size")


def test_parameter_level_problems_name_the_file():
    cfg = tiny_config()
    shapes = t5x_shapes(cfg)
    shapes["decoder/layers_2/self_attention/out/kernel"] = (60, 32)
    shapes["decoder/layers_0/self_attention/relpos/kernel"] = (4, 4)
    del shapes["decoder/layers_3/mlp/expert/wo/kernel"]
    problems = config_problems(cfg, shapes, _files(shapes), "ckpt/checkpoint")
    assert "decoder/layers_2/self_attention/out/kernel: shape [60, 32] in ckpt/decoder/layers_2/self_attention/" \
           "out/kernel does not match [64, 32] expected by the config" in problems
    assert "unexpected parameter decoder/layers_0/self_attention/relpos/kernel in " \
           "ckpt/decoder/layers_0/self_attention/relpos/kernel" in problems
    assert "missing parameter decoder/layers_3/mlp/expert/wo/kernel in ckpt/checkpoint" in problems


def test_inference_errors():
    shapes = t5x_shapes(tiny_config())
    del shapes["token_embedder/embedding"]
    with pytest.raises(CheckpointError, match="missing parameter token_embedder/embedding in ckpt"):
        infer_config(shapes, "ckpt")
    shapes = t5x_shapes(tiny_config(num_hidden_layers=6, moe_layer_interval=3))
    shapes = {n: s for n, s in shapes.items() if not n.startswith("decoder/layers_5/mlp/router")}
    with pytest.raises(CheckpointError, match=r"MoE layers \[2\] .* do not follow one interval"):
        infer_config(shapes, "ckpt")
    shapes = {n: s for n, s in t5x_shapes(tiny_config()).items() if not n.startswith("decoder/layers_1/")}
    with pytest.raises(CheckpointError, match="missing parameter decoder/layers_1/"):
        infer_config(shapes, "ckpt")
    with pytest.raises(CheckpointError, match="not a multiple of head_dim 24"):
        infer_config(t5x_shapes(tiny_config()), "ckpt", head_dim=24)


def test_dense_only_checkpoint():
    cfg = tiny_config(moe_layer_interval=5)  # 4 layers: none is MoE
    got = infer_config(t5x_shapes(cfg), "ckpt", head_dim=16)[0]
    assert config_fields(got) == config_fields(cfg)
    assert config_problems(got, t5x_shapes(cfg), _files(t5x_shapes(cfg)), "ckpt") == []


def test_load_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="--config nope: cannot read"):
        load_config("nope")
    (tmp_path / "config.json").write_text('{"hidden_act": "gelu"}')
    with pytest.raises(CheckpointError, match="invalid OpenMoE config"):
        load_config(str(tmp_path))
