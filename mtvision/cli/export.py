"""`mtv-export MODEL --format onnx|torchscript|exported-program --out FILE`: a pretrained folder as a
deployable graph with one named output per task and a dynamic batch size (see `mtvision/export.py`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mtvision.cli.common import parse, run_command

EXAMPLES = """examples:
  mtv-export runs/nyud_hps/model --format onnx --out hps.onnx
  mtv-export runs/nyud_hps/model --format torchscript --out depth.pt --tasks depth --decode
  mtv-export hf-hub:org/name --format exported-program --out model.pt2 --size 480 640

ONNX inputs: 'images', N x 3 x H x W float32, normalised with the model's preprocess mean/std
(stored in the file's 'mtvision_export' metadata); outputs: one per task, named by the task."""


def build_parser() -> argparse.ArgumentParser:
    from mtvision.export import FORMATS

    parser = argparse.ArgumentParser(
        prog="mtv-export",
        description="Export a pretrained model folder (or hf-hub:org/name) to ONNX, TorchScript or a torch.export "
        "ExportedProgram: one named output per task, dynamic batch size, fixed image size.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="pretrained folder (config.json + model.safetensors) or hf-hub:org/name")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument("--tasks", nargs="+", default=None, help="the outputs, in order (default: every task)")
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="input height and width (default: the model's preprocess.input_size, its training size)")
    parser.add_argument("--decode", action="store_true",
                        help="output decoded maps (class ids, metres, unit normals, probabilities) instead of raw ones")
    parser.add_argument("--check", action="store_true",
                        help="after writing, run the file on a random batch and compare with PyTorch (ONNX: onnxruntime)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    return run_command("mtv-export", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    from mtvision.errors import UnknownNameError
    from mtvision.export import ExportError, check_export, export_model
    from mtvision.models.pretrained import load_model

    model = load_model(args.model)
    try:
        names = model.select_tasks(args.tasks)
    except UnknownNameError as exc:  # a usage error: exit 2
        raise ExportError(str(exc)) from None
    start = time.perf_counter()
    out = export_model(model, args.out, args.format, tasks=names, size=args.size, decode=args.decode)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({args.format}, outputs {', '.join(names)}; {seconds:.1f} s)")
    if args.check:
        error = check_export(model, out, args.format, names, args.size, args.decode)
        print(f"check: largest difference from PyTorch {error:.2e}")


if __name__ == "__main__":
    sys.exit(main())
