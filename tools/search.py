"""Shim so that `python tools/search.py` and `torchrun ... tools/search.py` work from a checkout."""

import sys

from mtvision.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
