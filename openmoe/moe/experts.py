"""Old import paths, kept working: the expert sets (OpenMoeExperts among them) live in
expert_types.py, the kernels, their chooser and the backend registry in kernels.py."""

from .expert_types import OpenMoeExperts, StackedExperts, gated_mlp, shard_stacked_  # noqa: F401
from .kernels import (EXPERT_BACKENDS, compute_dtype, expert_of_rows, group_offsets, grouped_mm,  # noqa: F401
                      grouped_mm_available, grouped_mm_fn, loop_mm, register_expert_backend,
                      resolve_implementation)

experts_grouped_mm = EXPERT_BACKENDS["grouped_mm"]
experts_eager = EXPERT_BACKENDS["eager"]
