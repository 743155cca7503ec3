"""openmoe/peft: LoRA through PEFT on every target kind trains, merges to the same logits, keeps
the experts stacked on the grouped-GEMM path, and round-trips through the PEFT adapter format."""

import pytest
import torch
from torch import nn

from openmoe import OpenMoeForCausalLM
from openmoe.moe.experts import OpenMoeExperts
from openmoe.peft import LoraSpec, attach_lora, load_adapter, merge_lora, save_adapter
from openmoe.peft import expert_lora


def _model(tiny, **kw):
    """A tiny model with large random weights, so that every part (routing included) matters to
    the loss and a LoRA on any one of them can lower it."""
    m = OpenMoeForCausalLM(tiny(capacity_policy="dropless", **kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 1.0 if "gate_weight" in n else 0.3)
    return m


def _base_state(m):
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in m.named_parameters() if ".lora_" not in n}


@pytest.mark.parametrize("kind", ["attention", "mlp", "extra_mlp", "router", "experts"])
def test_each_target_kind_trains_and_merges_to_the_same_logits(tiny, kind):
    m = _model(tiny)
    attach_lora(m, LoraSpec(rank=4, alpha=8, targets=(kind,)))
    before = _base_state(m)
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(2, 97, (4, 24))
    losses = []
    for _ in range(10):
        out = m(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.97 * losses[0], losses
    after = _base_state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stayed frozen
    m.eval()
    with torch.no_grad():
        adapted = m(input_ids=ids).logits
        merged = merge_lora(m)(input_ids=ids).logits
    assert not any(".lora_" in n or ".base_layer" in n for n, _ in m.named_parameters())
    assert set(n for n, _ in m.named_parameters()) == set(before)  # a plain OpenMoE again
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4 * adapted.abs().max().item())


def test_expert_lora_runs_three_grouped_gemms_per_projection_on_the_stacked_weights(tiny, monkeypatch):
    m = _model(tiny, experts_implementation_name="grouped_mm")  # "auto" would pick the loop on CPU
    attach_lora(m, LoraSpec(rank=4, targets=("experts",)))
    stacks = [ex for ex in m.modules() if isinstance(ex, OpenMoeExperts)]
    assert len(stacks) == 2 and all(ex.implementation == expert_lora.BACKEND for ex in stacks)
    # No per-expert Linear: the only Linears under the experts are PEFT's lora_A / lora_B, one pair
    # per stacked projection, r * E wide.
    E, r = 4, 4
    for layer in m.model.layers:
        if not layer.is_moe:
            continue
        linears = [(n, mod) for n, mod in layer.mlp.named_modules() if isinstance(mod, nn.Linear)]
        assert len(linears) == 2 * 3
        for n, mod in linears:
            assert ".lora_A." in f".{n}." or ".lora_B." in f".{n}.", n
            assert r * E in (mod.in_features, mod.out_features)
    calls = []
    real = expert_lora.grouped_mm
    monkeypatch.setattr(expert_lora, "grouped_mm", lambda x, w, offs: calls.append(w) or real(x, w, offs))
    out = m(input_ids=torch.randint(2, 97, (2, 16)), labels=torch.randint(2, 97, (2, 16)), use_cache=False)
    out.loss.backward()
    stored = {id(p) for ex in stacks for p in ex.parameters(recurse=False)}
    base_calls = [w for w in calls if w.dim() == 3 and w.shape[-1] > r and w.shape[-2] > r]
    assert len(calls) == 2 * 3 * 3  # per MoE layer and projection: the stack, x @ lhs, (.) @ rhs
    assert len(base_calls) == 2 * 3 and all(id(w) in stored for w in base_calls)  # the Parameter itself
    grads = {n: p.grad for n, p in m.named_parameters() if ".lora_" in n}
    assert len(grads) == 2 * 3 * 2 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B" in n)  # A's is 0 while B = 0


def test_expert_lora_equals_the_hand_computed_update(tiny):
    """The backend's x @ W + s (x @ lhs) @ rhs against a plain experts module holding
    W + s * B_e A_e, built by hand from PEFT's lora_A / lora_B layout."""
    torch.manual_seed(0)
    E, H, I, r, alpha = 4, 32, 48, 4, 8
    ex = OpenMoeExperts(E, H, I)
    for w in ex.parameters():
        nn.init.normal_(w, std=0.2)
    holder = nn.Module()
    holder.experts = ex
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=[],
                                       target_parameters=[f"experts.{p}" for p in expert_lora.PROJECTIONS],
                                       init_lora_weights=False), holder)
    expert_lora.use_lora_backend(ex)
    x, counts = torch.randn(20, H), torch.tensor([6, 0, 9, 5])
    got = holder.experts(x, counts)

    ref = OpenMoeExperts(E, H, I, implementation="eager")
    wrappers = {m.parameter_name: m for m in holder.modules() if hasattr(m, "parameter_name")}
    with torch.no_grad():
        for name in expert_lora.PROJECTIONS:
            w = getattr(ex, name)
            A = wrappers[name].lora_A["default"].weight  # [r * E, in'] with in' = w.shape[2] (PEFT swaps)
            B = wrappers[name].lora_B["default"].weight  # [out' = w.shape[1], r * E]
            delta = torch.stack([B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])  # expert e's rank block
            getattr(ref, name).copy_(w + alpha / r * delta)
    torch.testing.assert_close(got, ref(x, counts), rtol=1e-5, atol=1e-5)


def test_adapter_save_load_round_trip_and_peft_loads_it(tiny, tmp_path):
    m = _model(tiny)
    attach_lora(m, LoraSpec(rank=4, targets=("attention", "mlp", "extra_mlp", "experts")))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.05)  # a non-zero update
    base = OpenMoeForCausalLM(m.config)
    base.load_state_dict(_base_state(m))
    base.save_pretrained(tmp_path / "base")
    save_adapter(m, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids = torch.randint(2, 97, (2, 12))
    m.eval()
    with torch.no_grad():
        want = m(input_ids=ids).logits
        ours = load_adapter(OpenMoeForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(input_ids=ids).logits, want)
        from peft import PeftModel  # the folder is PEFT's own format

        theirs = PeftModel.from_pretrained(OpenMoeForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        # PEFT's model computes the experts with the materialised W + dW: same values, other rounding
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_router_and_experts_together_round_trip(tiny, tmp_path):
    """PEFT cannot inject both in one pass (the wrapped MoE layer hides its experts); two passes
    at attach and at load give the same model back."""
    m = _model(tiny)
    attach_lora(m, LoraSpec(rank=2, targets=("router", "experts")))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.05)
    assert sorted(m.peft_config["default"].target_parameters) == sorted(
        ["mlp.gate_weight", "mlp.experts.wi_gate", "mlp.experts.wi_up", "mlp.experts.wo"])
    save_adapter(m, tmp_path / "adapter")
    fresh = OpenMoeForCausalLM(m.config)
    fresh.load_state_dict(_base_state(m))
    load_adapter(fresh, tmp_path / "adapter")
    ids = torch.randint(2, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, m.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("spec,msg", [
    (LoraSpec(rank=0), "lora_rank=0: must be a positive integer"),
    (LoraSpec(rank=-2), "lora_rank=-2"),
    (LoraSpec(targets=("attention", "brains")), "unknown target 'brains'"),
    (LoraSpec(dropout=0.1, targets=("experts",)), "lora_dropout=0.1: dropout does not work on the router and expert"),
])
def test_bad_specs_are_named(tiny, spec, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        attach_lora(OpenMoeForCausalLM(tiny()), spec)


def test_targets_that_match_nothing_are_named(tiny):
    dense_only = OpenMoeForCausalLM(tiny(moe_layer_interval=100))  # no MoE layer at all
    with pytest.raises(ValueError, match="'experts' matches nothing"):
        attach_lora(dense_only, LoraSpec(targets=("attention", "experts")))
