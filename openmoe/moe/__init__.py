"""The MoE layer: route -> dispatch -> experts -> combine."""

from .dispatch import DispatchPlan, LocalDispatcher
from .experts import EXPERT_BACKENDS, OpenMoeExperts, register_expert_backend
from .layer import MoELayer, MoEOutput
from .router import CapacityPolicy, Routing, route

__all__ = ["CapacityPolicy", "Routing", "route", "OpenMoeExperts", "EXPERT_BACKENDS",
           "register_expert_backend", "LocalDispatcher", "DispatchPlan", "MoELayer", "MoEOutput"]
