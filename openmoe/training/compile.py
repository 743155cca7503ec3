"""torch.compile for training: each decoder layer's forward, compiled in place.

Per layer, as torchtitan does, rather than the whole model: FSDP2's and activation
checkpointing's hooks stay outside the compiled code (they wrap the module call, not its
forward), parameter names and checkpoints are unchanged (no `_orig_mod.` prefix), and layers of
the same kind share one compiled graph (2 graphs for OpenMoE: dense and MoE layers). The loss
over the vocabulary is already one custom autograd function (openmoe/losses.py).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_layers(model: nn.Module, fullgraph: bool = True, **kwargs) -> int:
    """Compile the forward of every OpenMoE decoder layer in `model`; returns how many."""
    from ..modeling_openmoe import OpenMoeDecoderLayer

    n = 0
    for module in model.modules():
        if isinstance(module, OpenMoeDecoderLayer):
            module.forward = torch.compile(module.forward, fullgraph=fullgraph, **kwargs)
            n += 1
    if n == 0:
        raise ValueError(f"compile: no OpenMoE decoder layer found in {type(model).__name__}")
    return n
