"""openmoe/moe/upcycle.py: sparse upcycling of dense HF causal LMs, exactness at init, training,
save / load round trip, validation."""

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.activations import ACT2FN

from openmoe.moe import CapacityPolicy
from openmoe.moe.upcycle import (CONFIG_KEY, UPCYCLED_MODEL_TYPE, GatedExperts, UpcycledMoE,
                                 load_upcycled, moe_loss, moe_outputs, upcycle)

V = 64
_SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)


def _llama(**kw):
    return LlamaForCausalLM(LlamaConfig(**{**_SMALL, **kw}))


def _gpt2(**kw):
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                      bos_token_id=None, eos_token_id=None, **kw))


BUILDERS = {
    "llama": _llama,
    "llama_gelu": lambda: _llama(hidden_act="gelu_pytorch_tanh"),  # gated, not SiLU: GatedExperts
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SMALL)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_SMALL, head_dim=8)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_SMALL)),
    "gpt2": _gpt2,  # Conv1D, biases, gelu_new, output dropout
    "phi": lambda: PhiForCausalLM(PhiConfig(**_SMALL)),  # nn.Linear fc1 / fc2 with biases
}


def _dense(name):
    """A tiny dense model whose MLP weights and biases, and embeddings, are large enough that a
    wrong bias, activation or transpose shows in the logits (HF inits biases to 0, weights tiny)."""
    model = BUILDERS[name]().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".mlp." in pname:
                p.normal_(0.0, 0.3)
            elif any(k in pname for k in ("embed_tokens", "wte", "lm_head")):
                p.normal_(0.0, 1.0)
    return model


def _ids(batch=2, seq=7):
    return torch.randint(0, V, (batch, seq))


def _mlps(model):
    return [m for m in model.modules() if isinstance(m, UpcycledMoE)]


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


# --------------------------------------------------------------------------------------------
# Exactness before training


@pytest.mark.parametrize("name", list(BUILDERS))
def test_upcycled_logits_equal_dense(name):
    dense = _dense(name)
    moe = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2)
    assert len(_mlps(moe)) == 2
    experts = _mlps(moe)[0].moe.experts
    for stack in experts.stacked:
        w = getattr(experts, stack)
        assert torch.equal(w, w[:1].expand_as(w))  # all experts are the dense MLP
    ids = _ids()
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=0, atol=1e-5)


def test_gated_non_silu_keeps_its_activation():
    moe = upcycle(_dense("llama_gelu"), num_experts=2, top_k=1)
    experts = _mlps(moe)[0].moe.experts
    assert isinstance(experts, GatedExperts)
    assert type(experts.act).__name__ == type(ACT2FN["gelu_pytorch_tanh"]).__name__


def test_exactness_check_detects_a_wrong_bias_or_activation():
    """The 1e-5 comparison above would catch a dropped bias or the wrong GELU."""
    dense, ids = _dense("gpt2"), _ids()
    ref = _logits(dense, ids)
    moe = upcycle(copy.deepcopy(dense), num_experts=2, top_k=1)
    for up in _mlps(moe):
        assert type(up.moe.experts.act).__name__ == "NewGELUActivation"
        up.moe.experts.act = ACT2FN["gelu"]  # exact erf GELU instead of the tanh form
    assert (_logits(moe, ids) - ref).abs().max() > 1e-3
    moe = upcycle(copy.deepcopy(dense), num_experts=2, top_k=1)
    with torch.no_grad():
        _mlps(moe)[0].moe.experts.b_in.zero_()
    assert (_logits(moe, ids) - ref).abs().max() > 1e-3


def test_no_renormalisation_or_capacity_drops_break_exactness():
    dense, ids = _dense("llama"), _ids(4, 8)
    ref = _logits(dense, ids)
    plain = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, norm_topk_prob=False)
    assert (_logits(plain, ids) - ref).abs().max() > 1e-3  # output scaled by p1 + p2 < 1
    tight = CapacityPolicy("colossalai", 0.5, 0.5, min_capacity=0)
    dropping = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, capacity=tight)
    got = _logits(dropping, ids)
    assert all(o.dropped_fraction > 0 for o in moe_outputs(dropping).values())
    assert (got - ref).abs().max() > 1e-3


def test_generate_matches_dense_before_training():
    for name in ("llama", "gpt2"):
        dense = _dense(name)
        moe = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2)
        prompt = _ids(1, 4)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        out = moe.generate(prompt, **kw)
        assert out.shape == (1, 9)
        assert torch.equal(out, dense.generate(prompt, **kw))


# --------------------------------------------------------------------------------------------
# Which layers, validation


def test_every_and_layers_choose_the_upcycled_layers():
    def upcycled(model):
        return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, UpcycledMoE)]

    assert upcycled(upcycle(_llama(num_hidden_layers=5), num_experts=2, every=1)) == [0, 1, 2, 3, 4]
    model = upcycle(_llama(num_hidden_layers=5), num_experts=2, every=2)
    assert upcycled(model) == [1, 3]
    assert getattr(model.config, CONFIG_KEY)["layers"] == [1, 3]
    assert upcycled(upcycle(_llama(num_hidden_layers=5), num_experts=2, every=3)) == [2]
    assert upcycled(upcycle(_llama(num_hidden_layers=5), num_experts=2, layers=[0, 4])) == [0, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(num_experts=2, top_k=0), "top_k"),
    (dict(every=0), "every"),
    (dict(every=3), "every"),  # selects none of the 2 layers
    (dict(layers=[2]), "layers"),
    (dict(layers=[0], every=2), "every or layers"),
    (dict(router_init_std=-1.0), "router_init_std"),
])
def test_bad_arguments_raise(kwargs, match):
    model = _llama()
    with pytest.raises(ValueError, match=match):
        upcycle(model, **kwargs)
    assert not _mlps(model) and not hasattr(model.config, CONFIG_KEY)


def test_unrecognized_models_raise_and_stay_unchanged():
    with pytest.raises(ValueError, match="no decoder layers"):
        upcycle(nn.Sequential(nn.Linear(4, 4)))
    model = _llama()
    model.model.layers[1].mlp = nn.Identity()
    with pytest.raises(ValueError, match="layer 1 mlp: Identity"):
        upcycle(model, num_experts=2)
    assert not _mlps(model)  # layer 0 was not converted either: all MLPs are read first
    with pytest.raises(ValueError, match="biases"):
        upcycle(_llama(mlp_bias=True), num_experts=2)
    model = upcycle(_llama(), num_experts=2)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(model, num_experts=2)


# --------------------------------------------------------------------------------------------
# Training


def _train_step(model, ids, opt):
    model.train()
    out = model(ids, labels=ids)
    aux = moe_loss(model)
    (out.loss + aux).backward()
    opt.step()
    opt.zero_grad()
    return aux


def test_training_reaches_router_and_experts():
    model = upcycle(_dense("llama"), num_experts=4, top_k=2).train()
    ids = _ids(4, 8)
    out = model(ids, labels=ids)
    outs = moe_outputs(model)
    assert len(outs) == 2 and all(o.loss is not None for o in outs.values())
    aux = moe_loss(model)
    assert aux.item() > 0
    (out.loss + aux).backward()
    for up in _mlps(model):
        assert up.moe.gate_weight.grad.abs().sum() > 0
        for stack in up.moe.experts.stacked_parameters():
            assert stack.grad.abs().sum() > 0
    copy.deepcopy(model)  # last_output (graph tensors) must not break deepcopy

    before = copy.deepcopy(model.state_dict())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    up = _mlps(model)[0]
    assert not torch.equal(up.moe.gate_weight, before["model.layers.0.mlp.moe.gate_weight"])
    w = up.moe.experts.w_gate
    assert not torch.equal(w[0], w[1])  # the experts saw different tokens: they diverged
    # Now the experts differ, the task loss alone trains the router (at init it cannot).
    model(ids, labels=ids).loss.backward()
    assert up.moe.gate_weight.grad.abs().sum() > 0



def test_forward_with_output_returns_the_state_forward_keeps():
    """UpcycledMoE keeps the last call's MoEOutput in last_output (for moe_loss after an HF forward);
    forward_with_output hands the same back as a value and keeps nothing."""
    model = upcycle(_llama(), num_experts=2, seed=0).eval()
    up = _mlps(model)[0]
    x = torch.randn(2, 3, 32)
    y, out = up.forward_with_output(x)
    assert up.last_output is None
    assert torch.equal(up(x), y) and up.last_output is not None
    assert torch.equal(up.last_output.router_logits, out.router_logits)

@pytest.mark.parametrize("reentrant", [False, True])
def test_moe_loss_under_gradient_checkpointing(reentrant):
    model = upcycle(_llama(), num_experts=2).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    model(_ids())
    if reentrant:  # the forward ran under no_grad: the aux losses cannot train the router
        with pytest.warns(UserWarning, match="use_reentrant=False"):
            assert not moe_loss(model).requires_grad
    else:
        assert moe_loss(model).requires_grad


def test_moe_loss_is_zero_without_grad():
    model = upcycle(_llama(), num_experts=2).eval()
    with torch.no_grad():
        model(_ids())
    assert moe_loss(model).item() == 0.0


# --------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("name, shard", [("llama", None), ("gpt2", "20KB"), ("llama_gelu", "30KB")])
def test_save_load_round_trip(tmp_path, name, shard):
    model = upcycle(_dense(name), num_experts=4, top_k=2, every=2, capacity="t5x", noise="jitter")
    ids = _ids(4, 8)
    _train_step(model, ids, torch.optim.AdamW(model.parameters(), lr=1e-2))
    w0 = next(iter(_mlps(model)[0].moe.experts.stacked_parameters()))
    assert not torch.equal(w0[0], w0[1])  # a reload with fresh copies of one MLP would fail below

    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kw)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (shard is not None)
    spec = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert spec["layers"] == [1] and spec["num_experts"] == 4 and spec["capacity"] == "t5x"

    loaded = load_upcycled(tmp_path)
    assert not loaded.training and len(_mlps(loaded)) == 1
    assert _mlps(loaded)[0].moe.capacity.name == "t5x" and _mlps(loaded)[0].moe.noise.kind == "jitter"
    if name == "gpt2":  # lm_head is not in the file: it must still be tied to the embeddings
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.eval(), ids), rtol=0, atol=0)


def test_save_load_keeps_capacity_policy_objects(tmp_path):
    policy = CapacityPolicy("colossalai", 1.5, 2.5, min_capacity=2)
    upcycle(_llama(), num_experts=2, capacity=policy).save_pretrained(tmp_path)
    assert _mlps(load_upcycled(tmp_path))[0].moe.capacity == policy


def test_load_rejects_bad_checkpoints(tmp_path):
    _llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=CONFIG_KEY):
        load_upcycled(tmp_path / "dense")

    upcycle(_llama(), num_experts=2).save_pretrained(tmp_path / "moe")
    path = tmp_path / "moe" / "model.safetensors"
    weights = load_file(path)
    key = "model.layers.1.mlp.moe.experts.w_up"
    save_file({k: v for k, v in weights.items() if k != key}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing.*{key}"):
        load_upcycled(tmp_path / "moe")
    save_file({**weights, "model.layers.1.mlp.extra": torch.zeros(1)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unknown keys.*model.layers.1.mlp.extra"):
        load_upcycled(tmp_path / "moe")


# --------------------------------------------------------------------------------------------
# Remote code: AutoModelForCausalLM loads the folder, and never silently as the dense model


def _trained_and_saved(name, folder):
    """An upcycled model whose experts differ (a reload with fresh copies of the dense MLP would
    not match), saved to `folder`."""
    model = upcycle(_dense(name), num_experts=4, top_k=2, every=2, capacity="t5x", noise="jitter")
    _train_step(model, _ids(4, 8), torch.optim.AdamW(model.parameters(), lr=1e-2))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_trust_remote_code_reload_in_fresh_interpreter(tmp_path, name):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True) in an
    interpreter that never imports openmoe: the bundled code alone rebuilds the MoE model, with
    the same logits; a model loaded so saves its code again, and from_config works too."""
    model = _trained_and_saved(name, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == UPCYCLED_MODEL_TYPE
    assert config[CONFIG_KEY]["base_model_type"] == model.config.model_type
    assert config["architectures"] == [type(model).__name__]  # the base class's name, e.g. LlamaForCausalLM
    assert (tmp_path / "model" / "modeling_upcycled.py").exists()
    ids = _ids(2, 6)
    torch.save({"ids": ids, "logits": _logits(model, ids)}, tmp_path / "expect.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        folder, again = {str(tmp_path / "model")!r}, {str(tmp_path / "again")!r}
        e = torch.load({str(tmp_path / "expect.pt")!r})
        m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert not any(k == "openmoe" or k.startswith("openmoe.") for k in sys.modules), "openmoe imported"
        assert not m.training and type(m).__name__ == {type(model).__name__!r}
        assert sum(type(x).__name__ == "UpcycledMoE" for x in m.modules()) == 1
        with torch.no_grad():
            assert torch.equal(m(e["ids"]).logits, e["logits"])
        if {name!r} == "gpt2":
            assert m.lm_head.weight is m.transformer.wte.weight
        m.save_pretrained(again)  # saved from the bundle: the code travels again
        m2 = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)
        with torch.no_grad():
            assert torch.equal(m2(e["ids"]).logits, e["logits"])
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        fresh = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
        assert sum(type(x).__name__ == "UpcycledMoE" for x in fresh.modules()) == 1
        print("OK", type(m).__module__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK transformers_modules" in r.stdout
    assert (tmp_path / "again" / "moe_upcycle.py").exists()


def test_plain_auto_load_asks_for_trust_remote_code(tmp_path):
    """Without trust_remote_code, transformers itself refuses: config.json's model_type
    (openmoe_upcycled) is none of its own and auto_map names the folder's code, so it asks for
    trust_remote_code=True instead of building the dense model with random MLPs."""
    _trained_and_saved("llama", tmp_path)
    for trust in (None, False):
        kw = {} if trust is None else {"trust_remote_code": trust}
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(tmp_path, **kw)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoConfig.from_pretrained(tmp_path, **kw)


def test_load_refuses_an_unknown_base_architecture(tmp_path):
    """The folder's code can rebuild only an architecture transformers knows; it says so (the
    remote code calls the same load_upcycled)."""
    _trained_and_saved("llama", tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_KEY]["base_model_type"] = "no_such_arch"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base architecture 'no_such_arch' is not known"):
        load_upcycled(tmp_path)


def test_load_upcycled_reads_older_folders(tmp_path):
    """Folders saved before they were marked keep the base model_type and no base_model_type."""
    model = _trained_and_saved("gpt2", tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = config[CONFIG_KEY].pop("base_model_type")
    del config["auto_map"]
    path.write_text(json.dumps(config))
    ids = _ids()
    loaded = load_upcycled(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # saved again: marked, with the base type in the spec
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == UPCYCLED_MODEL_TYPE and config[CONFIG_KEY]["base_model_type"] == "gpt2"


def test_upcycled_models_pickle_and_still_save_their_code(tmp_path):
    """upcycle swaps in a subclass (made at run time) whose save_pretrained marks the folder:
    pickle and deepcopy must keep working and keep the mark."""
    model = upcycle(_dense("gpt2"), num_experts=2).eval()
    ids = _ids()
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(other) is type(model) and isinstance(other, GPT2LMHeadModel)
        assert other.lm_head.weight is other.transformer.wte.weight
        torch.testing.assert_close(_logits(other, ids), _logits(model, ids), rtol=0, atol=0)
    other.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == UPCYCLED_MODEL_TYPE


def test_save_pretrained_push_to_hub_refused(tmp_path):
    """transformers uploads inside save_pretrained, before the folder is marked: refused up front
    (nothing written, nothing uploaded); model.push_to_hub saves through save_pretrained."""
    model = upcycle(_llama(), num_experts=2)
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "m", push_to_hub=True)
    assert not (tmp_path / "m").exists()
