"""`mtv-convert FORMAT CHECKPOINT --dataset D --out DIR`: a released checkpoint (InvPT, TaskPrompter,
MTMamba, ...) as an mtvision pretrained folder, for `mtvision.load` and `mtv-eval`."""

from __future__ import annotations

import argparse
import sys

from mtvision.cli.common import parse, run_command

EXAMPLE = "mtv-convert invpt InvPT_nyud_vitl.pth.tar --dataset nyud --out models/invpt_nyud"


def build_parser() -> argparse.ArgumentParser:
    from mtvision.convert import FORMATS
    from mtvision.convert.base import DATASETS

    parser = argparse.ArgumentParser(
        prog="mtv-convert",
        description="Convert a released checkpoint into an mtvision pretrained folder (config.json + model.safetensors). "
        "The file is read with torch.load(weights_only=True): nothing in it is executed.",
        epilog=f"example: {EXAMPLE}\nexit codes: 0 done, 2 bad arguments or an unfit checkpoint, 1 runtime failure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=sorted(FORMATS), help="the model the checkpoint was released for")
    parser.add_argument("checkpoint", help="the released .pth / .pth.tar file")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset it was trained on")
    parser.add_argument("--out", required=True, help="the pretrained folder to write")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="input size the size-tied weights (position embeddings) were trained at (default: the release's)")
    parser.add_argument("--backbone", default=None, help="timm backbone name (default: inferred from the tensor shapes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    from mtvision.convert import convert_checkpoint

    def run() -> None:
        size = tuple(args.input_size) if args.input_size else None
        out = convert_checkpoint(args.format, args.checkpoint, args.dataset, args.out, input_size=size, backbone=args.backbone)
        print(f"pretrained model: {out}  (mtvision.load({str(out)!r}); mtv-eval {out} --config CONFIG)")

    return run_command("mtv-convert", run)


if __name__ == "__main__":
    sys.exit(main())
