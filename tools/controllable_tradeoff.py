"""Shim for `python tools/controllable_tradeoff.py ...` (see `mtvision/cli/tradeoff.py`)."""

import sys

from mtvision.cli.tradeoff import main

if __name__ == "__main__":
    sys.exit(main())
