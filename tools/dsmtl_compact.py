"""Prune a searched DSMTL model (`decoder_options.search: true`) to the compact architecture it chose.

    python tools/dsmtl_compact.py runs/synthetic_dsmtl_compact_resnet18/model runs/dsmtl_compact_model

Writes a pretrained folder holding only the private stage copies the search kept (same weights, the
same eval outputs) and prints the kept stages per task (`decoder_options.private_stages`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtvision.models.dsmtl_compact import write_compact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search_folder", help="pretrained folder of the searched DSMTL model")
    parser.add_argument("out_folder", help="where to write the compact model's pretrained folder")
    args = parser.parse_args()
    kept = write_compact(args.search_folder, args.out_folder)
    print(json.dumps({"private_stages": kept}))


if __name__ == "__main__":
    main()
