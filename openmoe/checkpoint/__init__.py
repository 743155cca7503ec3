"""Checkpoint formats: the original T5X/Jax OpenMoE checkpoints and their conversion to HF.

    from openmoe.checkpoint import iter_params, convert
    for name, tensor in iter_params("checkpoint_500000"): ...      # T5X names, lazily
    convert("checkpoint_500000", "openmoe-base-hf", config="base")  # what the CLI runs

t5x.py (+ msgpack_tree.py, zarr.py) reads; keymap.py maps names; infer_config.py settles the
config; shards.py writes safetensors; converter.py strings them together.
"""

from .converter import convert
from .errors import CheckpointError
from .t5x import T5XCheckpoint, iter_params

__all__ = ["CheckpointError", "T5XCheckpoint", "convert", "iter_params"]
