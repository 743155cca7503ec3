"""Published PyTorch OpenMoE checkpoints (ColossalAI layout) load as they are."""

import json

import torch

from openmoe import OpenMoeConfig, OpenMoeForCausalLM
from reference_openmoe import reference_logits
from test_modeling import ids_batch, make_model


def _colossalai_config(cfg: OpenMoeConfig) -> dict:
    # The fields of OrionZheng/openmoe-* config.json: a Llama config with OpenMoE fields added.
    return {
        "architectures": ["OpenMoeForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"},
        "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "swiglu", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "num_hidden_layers": cfg.num_hidden_layers,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": 1e-6,
        "vocab_size": cfg.vocab_size, "rope_scaling": None, "rope_theta": 10000.0,
        "pretraining_tp": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
        "num_experts": cfg.num_experts, "moe_layer_interval": cfg.moe_layer_interval,
        "router_topk": 2, "router_capacity_factor_train": 1.25, "router_capacity_factor_eval": 2.0,
        "router_min_capacity": 4, "router_noisy_policy": None, "router_drop_tks": True,
        "router_aux_loss_factor": 0.01, "router_z_loss_factor": 0.0001, "mlp_gated": True,
        "label_smoothing": 0.001, "z_loss_factor": 0.01, "enable_kernel": False,
        "enable_comm_overlap": False, "enable_hierarchical_alltoall": False,
        "expert_parallel": None, "dropout_rate": 0.0, "use_cache": True,
    }


def test_loads_sharded_bin_colossalai_folder(tiny, tmp_path):
    cfg = tiny(capacity_policy="t5x", capacity_factor_eval=8.0)  # no drops: comparable to reference
    src = make_model(cfg)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, tmp_path / fname)
        weight_map.update({k: fname for k in ks})
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    conf = _colossalai_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(conf))

    m = OpenMoeForCausalLM.from_pretrained(tmp_path).eval()
    c = m.config
    assert (c.num_experts_per_tok, c.min_capacity, c.router_z_loss_coef) == (2, 4, 1e-4)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 0 + 1, 0)  # umT5 facts, not Llama's
    assert c.hidden_act == "silu" and c.capacity_policy == "t5x"
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = ids_batch(1, 8)[0]
    out = m(ids[None]).logits[0]
    assert torch.allclose(out, reference_logits(sd, m.config, ids), atol=2e-4, rtol=1e-4)
