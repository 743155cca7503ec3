"""The parameters of an OpenMoE model, from its config on the meta device (nothing allocated):
shape, kind and layer of each, and which ones a run trains or adapts with LoRA."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from ..weight_kinds import FREEZE_GROUPS, KINDS, check_target_names, kind_of, weight_matches

FREEZE_KINDS = FREEZE_GROUPS  # TrainConfig.freeze groups -> kinds (the table of openmoe/weight_kinds.py)
QUANTIZABLE = ("attention", "mlp", "extra_mlp", "experts")  # Linear layers + our expert stacks

__all__ = ["FREEZE_KINDS", "KINDS", "QUANTIZABLE", "Param", "inventory", "lora_targets_of"]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None  # decoder layer index; None for embedding, final norm, lm_head
    leaf: str  # q_proj, gate_proj, wi_gate, gate_weight, weight, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def inventory(config) -> list[Param]:
    """Every parameter of the model `config` describes (the layout search asks many times)."""
    return list(_inventory(config.to_json_string(use_diff=False)))


@functools.lru_cache(maxsize=8)
def _inventory(config_json: str) -> tuple[Param, ...]:
    from .. import OpenMoeConfig, OpenMoeForCausalLM

    config = OpenMoeConfig(**json.loads(config_json))
    with torch.device("meta"):
        model = OpenMoeForCausalLM(config)
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") else None
        leaf = parts[-1] if parts[-1] != "weight" else parts[-2]
        out.append(Param(name, tuple(p.shape), kind_of(name), layer, leaf))
    return tuple(out)


def lora_targets_of(params: list[Param], targets) -> dict[str, int]:
    """name of each adapted parameter -> its LoRA parameter count per unit of rank, from the
    target table openmoe.peft uses too (openmoe/weight_kinds.py; a Linear [out, in]: r (in + out);
    an expert stack [E, a, b]: r E (a + b); the router [E, H]: r (E + H)). ValueError for a
    target that matches nothing."""
    hit: dict[str, int] = {}
    for t in check_target_names(list(targets)):
        matches = [p for p in params if weight_matches(p.name, t)]
        if not matches:
            raise ValueError(f"lora_targets: {t!r} matches nothing in this model")
        for p in matches:
            hit[p.name] = p.shape[0] * (p.shape[1] + p.shape[2]) if p.kind == "experts" else p.shape[0] + p.shape[1]
    return hit
