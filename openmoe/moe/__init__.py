"""The MoE layer: route -> dispatch -> experts -> combine. Public API for any PyTorch model:

    from openmoe.moe import MoELayer
    moe = MoELayer(hidden_size, num_experts, top_k=2, experts="swiglu", capacity="dropless")
    y, out = moe(x)                      # out.loss: weighted aux + z losses

Distributed helpers (expert_parallel, ddp_ignore_experts, set_expert_layout) live one layer up,
in openmoe.parallel, which applies them to a plain model from outside.
"""

from .dispatch import DispatchPlan, LocalDispatcher
from .expert_types import (EXPERT_TYPES, GatedExperts, MLPExperts, ModuleExperts, OpenMoeExperts, StackedExperts,
                           SwiGLUExperts)
from .kernels import EXPERT_BACKENDS, register_expert_backend
from .layer import MoELayer, MoEOutput
from .noise import RouterNoise
from .router import CapacityPolicy, Routing, route
from .upcycle import UpcycledMoE, load_upcycled, moe_loss, moe_outputs, upcycle

__all__ = ["CapacityPolicy", "Routing", "route", "OpenMoeExperts", "SwiGLUExperts", "GatedExperts", "MLPExperts",
           "ModuleExperts", "StackedExperts", "EXPERT_TYPES", "EXPERT_BACKENDS", "register_expert_backend",
           "LocalDispatcher", "DispatchPlan", "MoELayer", "MoEOutput", "RouterNoise",
           "upcycle", "load_upcycled", "moe_loss", "moe_outputs", "UpcycledMoE"]
