"""The MoE layer: route -> dispatch -> experts -> combine. Public API for any PyTorch model:

    from openmoe.moe import MoELayer
    moe = MoELayer(hidden_size, num_experts, top_k=2, experts="swiglu", capacity="dropless")
    y, out = moe(x)                      # out.loss: weighted aux + z losses

Distributed helpers (expert_parallel, ddp_ignore_experts, set_expert_layout) live in
openmoe.parallel and are re-exported here lazily (openmoe.parallel imports this package).
"""

from .dispatch import DispatchPlan, LocalDispatcher
from .expert_types import MLPExperts, ModuleExperts, StackedExperts, SwiGLUExperts
from .experts import EXPERT_BACKENDS, OpenMoeExperts, register_expert_backend
from .layer import MoELayer, MoEOutput
from .noise import RouterNoise
from .router import CapacityPolicy, Routing, route
from .upcycle import UpcycledMoE, load_upcycled, moe_loss, moe_outputs, upcycle

__all__ = ["CapacityPolicy", "Routing", "route", "OpenMoeExperts", "SwiGLUExperts", "MLPExperts",
           "ModuleExperts", "StackedExperts", "EXPERT_BACKENDS", "register_expert_backend",
           "LocalDispatcher", "DispatchPlan", "MoELayer", "MoEOutput", "RouterNoise",
           "expert_parallel", "ddp_ignore_experts", "set_expert_layout",
           "upcycle", "load_upcycled", "moe_loss", "moe_outputs", "UpcycledMoE"]

_LAZY = {"expert_parallel": "ddp", "ddp_ignore_experts": "ddp", "set_expert_layout": "expert_parallel"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"openmoe.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'openmoe.moe' has no attribute {name!r}")
