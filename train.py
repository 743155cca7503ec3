"""Run from a checkout: `python train.py ...` is `openmoe-train ...` (openmoe/cli/train.py; --help for usage)."""

import sys

from openmoe.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
