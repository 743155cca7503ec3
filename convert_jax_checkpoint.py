"""Run from a checkout: `python convert_jax_checkpoint.py ...` is `openmoe-convert ...` (openmoe/cli/convert.py; --help for usage)."""

import sys

from openmoe.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
