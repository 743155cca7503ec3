"""Memory planner: per-rank parameters, gradients, optimizer state and activations of a
training step, from the model config on the meta device (nothing allocated).

    from openmoe.planner import Layout, Workload, plan_memory
    plan = plan_memory(OpenMoeConfig.from_pretrained("configs/8b"), Workload(seq=2048, peft="lora"))
"""

from .layout import Layout, parse_size
from .memory import MemoryPlan, Workload, plan_memory

__all__ = ["Layout", "MemoryPlan", "Workload", "parse_size", "plan_memory"]
