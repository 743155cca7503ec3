"""T5X parameter names <-> OpenMoeForCausalLM parameter names, as one declarative table.

Each rule is (HF name, T5X name under `target/`, op); `{i}` is the layer index. T5X stores 2-D
kernels as [in, out], so they are transposed into torch's Linear [out, in]; the stacked expert
kernels are [E, in, out] and are used as `x @ W[e]` by both, so they are copied; the router
kernel [H, E] becomes `gate_weight` [E, H]. (docs/openmoe-numerics.md, section 5.)

Which rules apply to a model (dense vs MoE layers) is not decided here: the model's own
parameter list is mapped through the table, so the two can never drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COPY = "copy"
TRANSPOSE = "transpose"


@dataclass(frozen=True)
class Rule:
    hf: str
    t5x: str
    op: str


_L = "model.layers.{i}"
_T = "decoder/layers_{i}"

RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "token_embedder/embedding", COPY),
    # attention
    Rule(f"{_L}.input_layernorm.weight", f"{_T}/pre_self_attention_layer_norm/scale", COPY),
    Rule(f"{_L}.self_attn.q_proj.weight", f"{_T}/self_attention/query/kernel", TRANSPOSE),
    Rule(f"{_L}.self_attn.k_proj.weight", f"{_T}/self_attention/key/kernel", TRANSPOSE),
    Rule(f"{_L}.self_attn.v_proj.weight", f"{_T}/self_attention/value/kernel", TRANSPOSE),
    Rule(f"{_L}.self_attn.o_proj.weight", f"{_T}/self_attention/out/kernel", TRANSPOSE),
    Rule(f"{_L}.post_attention_layernorm.weight", f"{_T}/pre_mlp_layer_norm/scale", COPY),
    # dense layer MLP
    Rule(f"{_L}.mlp.gate_proj.weight", f"{_T}/mlp/wi_0/kernel", TRANSPOSE),
    Rule(f"{_L}.mlp.up_proj.weight", f"{_T}/mlp/wi_1/kernel", TRANSPOSE),
    Rule(f"{_L}.mlp.down_proj.weight", f"{_T}/mlp/wo/kernel", TRANSPOSE),
    # MoE layer: router, stacked experts, then the extra dense MLP
    Rule(f"{_L}.mlp.gate_weight", f"{_T}/mlp/router/router_weights/w/kernel", TRANSPOSE),
    Rule(f"{_L}.mlp.experts.wi_gate", f"{_T}/mlp/expert/wi_0/kernel", COPY),
    Rule(f"{_L}.mlp.experts.wi_up", f"{_T}/mlp/expert/wi_1/kernel", COPY),
    Rule(f"{_L}.mlp.experts.wo", f"{_T}/mlp/expert/wo/kernel", COPY),
    Rule(f"{_L}.pre_extra_mlp_layernorm.weight", f"{_T}/pre_extra_mlp_layer_norm/scale", COPY),
    Rule(f"{_L}.extra_mlp.gate_proj.weight", f"{_T}/extra_mlp/wi_0/kernel", TRANSPOSE),
    Rule(f"{_L}.extra_mlp.up_proj.weight", f"{_T}/extra_mlp/wi_1/kernel", TRANSPOSE),
    Rule(f"{_L}.extra_mlp.down_proj.weight", f"{_T}/extra_mlp/wo/kernel", TRANSPOSE),
    # head
    Rule("model.norm.weight", "decoder/decoder_norm/scale", COPY),
    Rule("lm_head.weight", "decoder/logits_dense/kernel", TRANSPOSE),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


# (pattern on one side, template of the other side, op), built once from RULES
_TO_HF = [(_pattern(r.t5x), r.hf, r.op) for r in RULES]
_TO_T5X = [(_pattern(r.hf), r.t5x, r.op) for r in RULES]


def _translate(name: str, table) -> tuple[str, str] | None:
    for pattern, template, op in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict()), op
    return None


def to_hf(t5x_name: str) -> tuple[str, str] | None:
    """(HF name, op) for a T5X parameter name, or None if no rule covers it."""
    return _translate(t5x_name, _TO_HF)


def to_t5x(hf_name: str) -> tuple[str, str] | None:
    """(T5X name, op) for an OpenMoeForCausalLM parameter name, or None."""
    return _translate(hf_name, _TO_T5X)


def hf_shape(t5x_shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    return tuple(reversed(t5x_shape)) if op == TRANSPOSE else tuple(t5x_shape)


def t5x_shape(hf_shape_: tuple[int, ...], op: str) -> tuple[int, ...]:
    return tuple(reversed(hf_shape_)) if op == TRANSPOSE else tuple(hf_shape_)


__all__ = ["RULES", "Rule", "COPY", "TRANSPOSE", "to_hf", "to_t5x", "hf_shape", "t5x_shape"]
