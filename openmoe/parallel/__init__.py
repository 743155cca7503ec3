"""Parallelism applied to a plain model from outside: mesh and groups, expert parallelism,
gradient reduction and clipping."""

from .ddp import ddp_ignore_experts, expert_parallel
from .expert_parallel import AllToAllDispatcher, set_expert_layout, shard_experts
from .grads import clip_grad_norm, is_expert, sync_gradients
from .mesh import ParallelState, build_state, init_distributed
from .parallelize import parallelize

__all__ = ["AllToAllDispatcher", "shard_experts", "set_expert_layout", "expert_parallel", "ddp_ignore_experts", "clip_grad_norm", "is_expert", "sync_gradients",
           "ParallelState", "build_state", "init_distributed", "parallelize"]
