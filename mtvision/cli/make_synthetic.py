"""`mtv-make-synthetic`: write synthetic scenes in the NYUD-v2 or PASCAL-Context layout plus a preview picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtvision import visualize
from mtvision.data.synthetic_export import LAYOUTS, preview_grid

EXAMPLES = """\
examples:
  # NYUD-v2 layout (images/, segmentation/, depth/, normals/, edge/, gt_sets/), for configs/nyud/*.yaml
  mtv-make-synthetic --out data/NYUDv2 --num 200
  mtv-train configs/nyud/hps_vitl16_448x576.yaml data.root=data/NYUDv2

  # PASCAL-Context layout (JPEGImages/, semseg/pascal-context/, human_parts/*.mat, sal_distill/,
  # normals_distill/, edge/, pascal-context/trainval/*.mat, ImageSets/Context/), for configs/pascal/*.yaml;
  # semseg in the 21 VOC classes, and the pillars stand in for persons with stand-in human parts
  mtv-make-synthetic --layout pascal --out data/PASCAL_MT --num 200 --height 128 --width 128
  mtv-train configs/pascal/hps_vitl16_512x512.yaml data.root=data/PASCAL_MT
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-make-synthetic",
        description=(
            "Render procedural indoor scenes and write them in the NYUD-v2 or the PASCAL-Context layout, "
            "with a preview.png grid, so that the real loaders and recipes run on them."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="nyud", help="dataset layout to write (default nyud)"
    )
    parser.add_argument("--num", type=int, default=100, help="number of scenes (default 100)")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels (default 128)")
    parser.add_argument("--width", type=int, default=160, help="image width in pixels (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; scene i is a pure function of (seed, i)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2,
        help="fraction of scenes in the val split (gt_sets/val.txt, or ImageSets/Context/val.txt for pascal)",
    )
    parser.add_argument("--preview-rows", type=int, default=6, help="scenes shown in preview.png (0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1 or args.height < 8 or args.width < 8:
        print("mtv-make-synthetic: --num must be >= 1 and --height/--width >= 8", file=sys.stderr)
        return 2
    if not 0.0 <= args.val_fraction < 1.0:
        print("mtv-make-synthetic: --val-fraction must be in [0, 1)", file=sys.stderr)
        return 2
    ids = LAYOUTS[args.layout](
        args.out, args.num, args.height, args.width, args.seed, args.val_fraction, progress=not args.no_progress
    )
    name = {"nyud": "NYUD-v2", "pascal": "PASCAL-Context"}[args.layout]
    print(f"wrote {len(ids)} scenes ({args.height}x{args.width}) in the {name} layout to {args.out}")
    if args.preview_rows > 0:
        path = args.out / "preview.png"
        grid = preview_grid(args.seed, min(args.preview_rows, args.num), args.height, args.width)
        visualize.save_png(str(path), grid)
        print(f"preview: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
