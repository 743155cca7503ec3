"""Parallelism applied to a plain model from outside: mesh and groups, expert parallelism,
gradient reduction and clipping."""

from .expert_parallel import AllToAllDispatcher, shard_experts
from .grads import clip_grad_norm, is_expert, sync_gradients
from .mesh import ParallelState, build_state, init_distributed
from .parallelize import parallelize

__all__ = ["AllToAllDispatcher", "shard_experts", "clip_grad_norm", "is_expert", "sync_gradients",
           "ParallelState", "build_state", "init_distributed", "parallelize"]
