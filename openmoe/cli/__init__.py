"""The command-line programs: `openmoe-train`, `openmoe-infer`, `openmoe-convert` (installed
console commands), also run as `python train.py` / `infer.py` / `convert_jax_checkpoint.py` from a
checkout (thin wrappers over these modules)."""
