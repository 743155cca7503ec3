"""LoRA target names -> what PEFT adapts on an OpenMoE model.

Users name kinds of weights (`attention`, `mlp`, `extra_mlp`, `router`, `experts`) or single
projections (`q_proj`, ..., `gate_proj`, `wi_gate`, ...); the names and the weights each one
selects are openmoe/weight_kinds.py's table. Linear projections become PEFT `target_modules` (a
regex over module names); the router and the stacked expert tensors are plain nn.Parameters and
become PEFT `target_parameters` (lora.ParamWrapper), so the experts stay stacked [E, in, out] and
run through the grouped GEMM (see expert_lora.py).

No torch or peft import here: TrainConfig validation uses this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..weight_kinds import (ATTENTION, DEFAULT_LORA_TARGETS, EXPERTS, MLP, TARGET_KINDS, TARGET_SINGLE, TARGETS,
                            check_target_names, weight_matches)

KINDS = TARGET_KINDS
SINGLE = TARGET_SINGLE
KNOWN = TARGETS
DEFAULT_TARGETS = DEFAULT_LORA_TARGETS

__all__ = ["ATTENTION", "DEFAULT_TARGETS", "EXPERTS", "KINDS", "KNOWN", "MLP", "SINGLE", "TargetSelection",
           "check_target_names", "select", "weight_matches"]


@dataclass(frozen=True)
class TargetSelection:
    module_regex: str | None  # for PEFT target_modules (full match on the module name)
    expert_params: tuple[str, ...]  # PEFT target_parameters on the stacked experts
    router_params: tuple[str, ...]  # PEFT target_parameters on MoELayer.gate_weight

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.expert_params + self.router_params


def select(targets) -> TargetSelection:
    alts, params = [], []
    for t in check_target_names(targets):
        m, p = KNOWN[t]
        alts += [a for a in m if a not in alts]
        params += [q for q in p if q not in params]
    regex = rf"model\.layers\.\d+\.(?:{'|'.join(alts)})" if alts else None
    return TargetSelection(regex, tuple(p for p in params if ".experts." in p),
                           tuple(p for p in params if ".experts." not in p))
