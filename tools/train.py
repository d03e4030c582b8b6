"""Shim so that `python tools/train.py` and `torchrun ... tools/train.py` work from a checkout."""

import sys

from mtvision.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
