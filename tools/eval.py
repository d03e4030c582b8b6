"""Shim for `python tools/eval.py ...` (see `mtv-eval --help`)."""

import sys

from mtvision.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
