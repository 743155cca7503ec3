"""LoRA target names -> what PEFT adapts on an OpenMoE model.

Users name kinds of weights (`attention`, `mlp`, `extra_mlp`, `router`, `experts`) or single
projections (`q_proj`, ..., `gate_proj`, `wi_gate`, ...). Linear projections become PEFT
`target_modules` (a regex over module names); the router and the stacked expert tensors are
plain nn.Parameters and become PEFT `target_parameters` (lora.ParamWrapper), so the experts stay
stacked [E, in, out] and run through the grouped GEMM (see expert_lora.py).

No torch or peft import here: TrainConfig validation and the planner use this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("wi_gate", "wi_up", "wo")

# kind -> (module regex alternatives under model.layers.N., parameter suffixes)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (tuple(rf"self_attn\.{p}" for p in ATTENTION), ()),
    "mlp": (tuple(rf"mlp\.{p}" for p in MLP), ()),  # dense layers only: a MoE layer's mlp has none
    "extra_mlp": (tuple(rf"extra_mlp\.{p}" for p in MLP), ()),
    "router": ((), ("mlp.gate_weight",)),
    "experts": ((), tuple(f"mlp.experts.{p}" for p in EXPERTS)),
}
SINGLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{p: ((rf"self_attn\.{p}",), ()) for p in ATTENTION},
    **{p: ((rf"mlp\.{p}", rf"extra_mlp\.{p}"), ()) for p in MLP},
    **{p: ((), (f"mlp.experts.{p}",)) for p in EXPERTS},
}
KNOWN = {**KINDS, **SINGLE}
DEFAULT_TARGETS = ["attention", "mlp", "extra_mlp", "experts"]


@dataclass(frozen=True)
class TargetSelection:
    module_regex: str | None  # for PEFT target_modules (full match on the module name)
    expert_params: tuple[str, ...]  # PEFT target_parameters on the stacked experts
    router_params: tuple[str, ...]  # PEFT target_parameters on MoELayer.gate_weight

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.expert_params + self.router_params


def check_target_names(targets) -> list[str]:
    """The list of names, or ValueError naming the bad one."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError("give at least one target")
    bad = [t for t in targets if t not in KNOWN]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r}; choose kinds {sorted(KINDS)} or single weights "
                         f"{sorted(SINGLE)}")
    return list(targets)


def select(targets) -> TargetSelection:
    alts, params = [], []
    for t in check_target_names(targets):
        m, p = KNOWN[t]
        alts += [a for a in m if a not in alts]
        params += [q for q in p if q not in params]
    regex = rf"model\.layers\.\d+\.(?:{'|'.join(alts)})" if alts else None
    return TargetSelection(regex, tuple(p for p in params if ".experts." in p),
                           tuple(p for p in params if ".experts." not in p))


def weight_matches(param_name: str, target: str) -> bool:
    """Whether the weight `param_name` (as in named_parameters: model.layers.3.self_attn.q_proj.weight,
    model.layers.5.mlp.experts.wo) is adapted by `target`."""
    mods, suffixes = KNOWN[target]
    if mods and re.fullmatch(rf"model\.layers\.\d+\.(?:{'|'.join(mods)})\.weight", param_name):
        return True
    return any(param_name.endswith("." + s) for s in suffixes)
