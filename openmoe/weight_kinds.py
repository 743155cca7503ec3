"""Kinds of weights of an OpenMoE model, from their names: the one table behind everything that
selects weights by kind (the planner's inventory, `--freeze` groups, LoRA targets).

Names are those of OpenMoeForCausalLM.named_parameters(): model.embed_tokens.weight,
model.layers.N.self_attn.q_proj.weight, model.layers.N.mlp.gate_weight (the router),
model.layers.N.mlp.experts.wo (a stacked [E, I, H] tensor), model.norm.weight, lm_head.weight.

No torch or peft import and no import of another openmoe package: TrainConfig validation, the
planner, the optimizer and openmoe.peft all use it, so it sits below them.
"""

from __future__ import annotations

import re

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("wi_gate", "wi_up", "wo")

# kind of a decoder layer's weights -> (module path under model.layers.N, the weights there).
# attention / mlp / extra_mlp weights are nn.Linear modules (`PATH.LEAF.weight`); the router and
# the stacked experts are plain nn.Parameters (`PATH.LEAF`).
LAYER_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attention": ("self_attn", ATTENTION),
    "mlp": ("mlp", MLP),  # dense layers only: a MoE layer's mlp holds the router and the experts
    "extra_mlp": ("extra_mlp", MLP),
    "router": ("mlp", ("gate_weight",)),
    "experts": ("mlp.experts", EXPERTS),
}
LINEAR_KINDS = ("attention", "mlp", "extra_mlp")
KINDS = ("embedding", "lm_head", *LAYER_KINDS, "norm")

# TrainConfig.freeze groups -> the kinds each freezes
FREEZE_GROUPS: dict[str, tuple[str, ...]] = {
    "router": ("router",), "experts": ("experts",), "embeddings": ("embedding",), "lm_head": ("lm_head",),
    "attention": ("attention",), "mlp": ("mlp", "extra_mlp"), "norms": ("norm",)}


def kind_of(name: str) -> str:
    """The kind (one of KINDS) of the parameter `name`."""
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".extra_mlp." in name:
        return "extra_mlp"
    if ".mlp.experts." in name:
        return "experts"
    if name.endswith(".mlp.gate_weight"):
        return "router"
    if ".mlp." in name:
        return "mlp"
    return "norm"


# ------------------------------------------------------------------ LoRA targets
# A target names a kind of LAYER_KINDS or one weight (q_proj, gate_proj, wi_gate, ...; the router
# only as a kind). Each maps to (module regex alternatives under model.layers.N. for the Linear
# weights, parameter suffixes for the plain ones).
Target = tuple[tuple[str, ...], tuple[str, ...]]


def _escaped(path: str) -> str:
    return path.replace(".", r"\.")


def _kind_target(kind: str) -> Target:
    path, leaves = LAYER_KINDS[kind]
    if kind in LINEAR_KINDS:
        return tuple(_escaped(f"{path}.{leaf}") for leaf in leaves), ()
    return (), tuple(f"{path}.{leaf}" for leaf in leaves)


def _single_targets() -> dict[str, Target]:
    out: dict[str, Target] = {}
    for kind in LAYER_KINDS:
        if kind == "router":
            continue
        mods, params = _kind_target(kind)
        for i, leaf in enumerate(LAYER_KINDS[kind][1]):
            m, p = out.get(leaf, ((), ()))
            out[leaf] = (m + mods[i:i + 1], p + params[i:i + 1])
    return out


TARGET_KINDS: dict[str, Target] = {k: _kind_target(k) for k in LAYER_KINDS}
TARGET_SINGLE: dict[str, Target] = _single_targets()
TARGETS: dict[str, Target] = {**TARGET_KINDS, **TARGET_SINGLE}
DEFAULT_LORA_TARGETS = ["attention", "mlp", "extra_mlp", "experts"]


def parse_targets(value) -> tuple:
    """TrainConfig.lora_targets ("attention,experts" or a list) as a tuple of names, unchecked."""
    return tuple(value.split(",") if isinstance(value, str) else value or ())


def check_target_names(targets) -> list[str]:
    """The list of names, or ValueError naming the bad one."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError("give at least one target")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r}; choose kinds {sorted(TARGET_KINDS)} or single weights "
                         f"{sorted(TARGET_SINGLE)}")
    return list(targets)


def weight_matches(param_name: str, target: str) -> bool:
    """Whether the weight `param_name` (as in named_parameters: model.layers.3.self_attn.q_proj.weight,
    model.layers.5.mlp.experts.wo) is adapted by `target`."""
    mods, suffixes = TARGETS[target]
    if mods and re.fullmatch(rf"model\.layers\.\d+\.(?:{'|'.join(mods)})\.weight", param_name):
        return True
    return any(param_name.endswith("." + s) for s in suffixes)
