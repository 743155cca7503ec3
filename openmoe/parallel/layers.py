"""Finding the MoE layers of any model: the one scan parallel/ uses, so nothing here assumes a
model's attribute names (OpenMoE's `model.layers`, `.mlp.experts.`)."""

from __future__ import annotations

import torch


def moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, layer) of every MoELayer of `model`, each module once: a layer shared by
    several blocks (WideNet) comes once, under its first name."""
    from ..moe.layer import MoELayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_parallel_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The MoE layers whose experts are split over an EP group (their dispatcher says so:
    AllToAllDispatcher.splits_experts)."""
    return [(n, m) for n, m in moe_layers(model) if getattr(m.dispatcher, "splits_experts", False)]
