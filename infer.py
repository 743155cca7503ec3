"""Run from a checkout: `python infer.py ...` is `openmoe-infer ...` (openmoe/cli/infer.py; --help for usage)."""

import sys

from openmoe.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
