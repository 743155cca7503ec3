"""The planner's kept-for-backward bytes, layer by layer, against what autograd actually saves
(saved-tensor hooks, each storage counted once, parameters excluded)."""

import pytest
import torch

from openmoe import OpenMoeForCausalLM
from openmoe.peft import LoraSpec, attach_lora
from openmoe.planner.layout import Layout
from openmoe.planner.memory import Workload, _trainable_and_lora, _units
from openmoe.planner.params import inventory


def _saved_bytes_per_stage(model, ids, dtype):
    """{embedding | L<i> | head: bytes of the storages saved for backward while it ran}."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stage, seen = ["embedding"], {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: stage.__setitem__(0, f"L{i}"))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: stage.__setitem__(0, "head")))

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen[s.data_ptr()] = (stage[0], s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(input_ids=ids, labels=ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for name, n in seen.values():
        out[name] = out.get(name, 0) + n
    return out


@pytest.mark.parametrize("compute,targets", [
    ("fp32", None), ("bf16", None),
    ("fp32", ("attention", "mlp", "extra_mlp", "experts")),
    ("bf16", ("attention", "mlp", "extra_mlp", "router", "experts")),
    ("bf16", ("attention",)), ("bf16", ("experts",)), ("bf16", ("q_proj", "wo")),
])
def test_planned_activations_match_saved_tensors(tiny, compute, targets):
    cfg = tiny(capacity_policy="dropless", hidden_size=64, intermediate_size=128, vocab_size=256)
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    m = OpenMoeForCausalLM(cfg).train()
    if targets:
        m.to(dtype)
        attach_lora(m, LoraSpec(rank=8, targets=targets))
    B, S = 4, 64
    measured = _saved_bytes_per_stage(m, torch.randint(2, cfg.vocab_size, (B, S)), dtype)
    w = Workload(batch=B, seq=S, compute=compute, peft="lora" if targets else None,
                 lora_targets=targets or (), device="cpu")
    params = inventory(cfg)
    trains, lora = _trainable_and_lora(params, w)
    units = _units(cfg, params, trains, lora, w, Layout())
    names = ["embedding"] + [f"L{i}" for i in range(cfg.num_hidden_layers)] + ["head"]
    # the embedding stage's plan also counts the packed-sequence mask and the RoPE tables that
    # autograd first sees in layer 0: compare the two together
    planned = {n: u.kept for n, u in zip(names, units)}
    planned["L0"] += planned.pop("embedding")
    measured["L0"] = measured.get("L0", 0) + measured.pop("embedding", 0)
    mask = B * S * S  # not built here (no packed position ids)
    planned["L0"] -= mask
    rope = 2 * cfg.head_dim * B * S * 4  # saved with the first attention in the graph: may move a stage
    for n in planned:
        got, want = measured.get(n, 0), planned[n]
        assert abs(got - want) <= 0.06 * got + rope + 4096, (n, got, want, measured, planned)
