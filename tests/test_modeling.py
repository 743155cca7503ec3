"""openmoe/modeling_openmoe.py: numerics against an independent reference, HF behaviours."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from openmoe import OpenMoeConfig, OpenMoeForCausalLM
from reference_openmoe import reference_logits


def make_model(cfg, std=0.3, seed=0):
    torch.manual_seed(seed)
    m = OpenMoeForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init so routing and attention matter
        for n, p in m.named_parameters():
            if not n.endswith("layernorm.weight") and not n.endswith("norm.weight"):
                p.normal_(0, std)
            else:
                p.uniform_(0.5, 1.5)
    return m.eval()


def ids_batch(B, S, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    ids[:, 0] = 0  # BOS = pad id 0
    return ids


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_independent_reference_forward(tiny, attn):
    cfg = tiny(capacity_policy="dropless", attn_implementation=attn)
    m = make_model(cfg)
    ids = ids_batch(1, 9)[0]
    ref = reference_logits(m.state_dict(), cfg, ids)
    out = m(ids[None]).logits[0]
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (out - ref).abs().max()


def test_t5x_eval_capacity_without_drops_matches_reference(tiny):
    cfg = tiny(capacity_policy="t5x", capacity_factor_eval=8.0)
    m = make_model(cfg)
    ids = ids_batch(1, 8)[0]
    out = m(ids[None])
    assert out.dropped_fraction.sum() == 0
    assert torch.allclose(out.logits[0], reference_logits(m.state_dict(), cfg, ids), atol=2e-4, rtol=1e-4)


def _count_by_hand(H, I, L, N, E, V, heads, hd):
    attn = 4 * H * heads * hd + 2 * H  # q, k, v, o (no biases) + two norms
    mlp = H * 2 * I + H * I + I * H  # gate is 2I wide
    moe = E * H + E * mlp + mlp + H  # router, experts, extra MLP and its norm
    n_moe = L // N
    return 2 * V * H + L * attn + (L - n_moe) * mlp + n_moe * moe + H


@pytest.mark.parametrize("name,expected", [("base", 799_663_104), ("8b", 11_855_046_656),
                                           ("34b", 46_270_737_408)])
def test_parameter_counts_on_meta(name, expected):
    cfg = OpenMoeConfig.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    with torch.device("meta"):
        m = OpenMoeForCausalLM(cfg)
    n = sum(p.numel() for p in m.parameters())
    hand = _count_by_hand(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                          cfg.moe_layer_interval, cfg.num_experts, cfg.vocab_size,
                          cfg.num_attention_heads, cfg.head_dim)
    assert n == hand == expected


def test_eager_equals_sdpa_with_left_padding(tiny):
    cfg = tiny(capacity_policy="dropless")
    m = make_model(cfg)
    ids = ids_batch(2, 8)
    ids[1, :3] = 0  # left padding; position 3 is row 1's BOS
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs = {}
    for impl in ("eager", "sdpa"):
        m.config._attn_implementation = impl
        outs[impl] = m(ids, attention_mask=mask).logits
    assert torch.allclose(outs["eager"][mask.bool()], outs["sdpa"][mask.bool()], atol=1e-4)


def test_left_padded_batch_equals_unpadded_rows(tiny):
    cfg = tiny(capacity_policy="dropless")
    m = make_model(cfg)
    a, b = ids_batch(1, 8, seed=1)[0], ids_batch(1, 5, seed=2)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    logits = m(batch, attention_mask=mask).logits
    assert torch.allclose(logits[0], m(a[None]).logits[0], atol=1e-4)
    # position ids: generate() derives them from the mask; here pass them as generate would
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = m(batch, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(logits[1, 3:], m(b[None]).logits[0], atol=1e-4)
    gen = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen[0, 8:], m.generate(a[None], max_new_tokens=6, do_sample=False)[0, 8:])
    assert torch.equal(gen[1, 8:], m.generate(b[None], max_new_tokens=6, do_sample=False)[0, 5:])


def test_generation_with_cache_equals_without(tiny):
    cfg = tiny(capacity_policy="dropless")
    m = make_model(cfg)
    ids = ids_batch(2, 6)
    g1 = m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    g2 = m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)
    # step logits too: prefill + one cached step == full forward
    full = m(g1[:, :7]).logits[:, -1]
    out = m(g1[:, :6], use_cache=True)
    step = m(g1[:, 6:7], cache=out.cache).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_decode_steps_route_alone_and_never_drop(tiny):
    # t5x at decode: each step's B tokens are padded to E and routed in E groups of one with
    # capacity >= 4 (docs/openmoe-numerics.md, section 3), so no generated token is dropped.
    cfg = tiny(capacity_policy="t5x", capacity_factor_eval=0.5, min_capacity=4)
    m = make_model(cfg)
    out = m(ids_batch(3, 6), use_cache=True)
    step = m(torch.tensor([[5], [6], [7]]), cache=out.cache)
    assert step.dropped_fraction.sum() == 0


def test_generate_treats_leading_zero_as_bos_not_padding(tiny):
    cfg = tiny(capacity_policy="dropless")
    m = make_model(cfg)
    ids = ids_batch(1, 6)
    g_auto = m.generate(ids, max_new_tokens=5, do_sample=False)
    g_ones = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(g_auto, g_ones)
    from openmoe import bos_aware_attention_mask
    assert bos_aware_attention_mask(torch.tensor([[0, 0, 0, 5, 6], [0, 4, 0, 7, 0]])).tolist() == \
        [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_losses_are_returned_separately_and_labels_mask(tiny):
    cfg = tiny(capacity_policy="dropless", output_router_logits=True)
    m = make_model(cfg, std=0.1)
    ids = ids_batch(2, 7)
    labels = ids.clone()
    labels[0, :4] = -100
    out = m(ids, labels=labels)
    lg = out.logits[:, :-1].reshape(-1, cfg.vocab_size)
    tgt = labels[:, 1:].reshape(-1)
    keep = tgt != -100
    ce = torch.nn.functional.cross_entropy(lg[keep], tgt[keep])
    assert torch.allclose(out.lm_loss, ce, atol=1e-5)
    oz = (torch.logsumexp(lg[keep], -1) ** 2).mean()
    assert torch.allclose(out.output_z_loss, oz, rtol=1e-5)
    total = ce + cfg.output_z_loss_coef * oz + cfg.router_aux_loss_coef * out.aux_loss \
        + cfg.router_z_loss_coef * out.router_z_loss
    assert torch.allclose(out.loss, total, rtol=1e-6)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (14, 4)
    assert out.tokens_per_expert.shape == (2, 4) and out.tokens_per_expert.sum() == 2 * 14 * 2


def test_gradient_checkpointing_same_gradients(tiny):
    cfg = tiny(capacity_policy="dropless")
    ids = ids_batch(2, 6)
    grads = []
    for ckpt in (False, True):
        m = make_model(cfg, std=0.1).train()
        if ckpt:
            m.activation_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_flash_attention_missing_is_a_clear_error(tiny, tmp_path):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    make_model(tiny()).save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="(?i)flash"):
        OpenMoeForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("field,value,match", [
    ("num_experts_per_tok", 5, "num_experts_per_tok"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("capacity_policy", "greedy", "capacity_policy"),
    ("hidden_size", 0, "hidden_size"),
    ("capacity_factor_eval", -1.0, "capacity_factor_eval"),
    ("experts_implementation_name", "cuda_magic", "experts_implementation_name"),
])
def test_bad_config_values_name_the_field(tiny, field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_save_load_round_trip_auto_class(tiny, tmp_path):
    m = make_model(tiny())
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "openmoe" and "AutoModelForCausalLM" in cfg["auto_map"]
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(m2, OpenMoeForCausalLM)
    ids = ids_batch(2, 6)
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_trust_remote_code_in_fresh_interpreter(tiny, tmp_path):
    m = make_model(tiny())
    m.save_pretrained(tmp_path / "model")
    ids = ids_batch(1, 6)
    torch.save({"ids": ids, "logits": m(ids).logits}, tmp_path / "expect.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
        assert not any(k == "openmoe" or k.startswith("openmoe.") for k in sys.modules), "openmoe imported"
        e = torch.load({str(tmp_path / 'expect.pt')!r})
        assert torch.equal(m(e["ids"]).logits, e["logits"])
        m.save_pretrained({str(tmp_path / 'again')!r})  # a remote-code model saves its code too
        print("OK", type(m).__module__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK transformers_modules" in r.stdout
    assert (tmp_path / "again" / "moe_router.py").exists()


def test_device_map_auto_loads(tiny, tmp_path):
    pytest.importorskip("accelerate")
    m = make_model(tiny())
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")  # _no_split_modules
    ids = ids_batch(1, 5)
    assert torch.allclose(m(ids).logits, m2(ids).logits.to("cpu"))


def test_router_losses_skipped_only_at_inference(tiny):
    m = make_model(tiny(capacity_policy="dropless"))
    ids = ids_batch(1, 6)
    assert m(ids).aux_loss is not None  # eval, grad enabled (e.g. an eval loss with backward)
    with torch.no_grad():
        out = m(ids, labels=ids)
        assert out.aux_loss is None and out.router_z_loss is None
        assert torch.allclose(out.loss, out.lm_loss + m.config.output_z_loss_coef * out.output_z_loss)
    m.train()
    with torch.no_grad():
        assert m(ids).aux_loss is not None  # training mode always reports them
