"""`mtv-predict`: run a pretrained model on an image or a folder of images and write pictures a person
can read (each map with its legend, colour bar or colour key), optionally the arrays."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtvision.cli.common import USAGE, parse, run_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

EXAMPLES = """examples:
  mtv-predict --model runs/nyud_hps/model --input photo.jpg --out predictions --panel
  mtv-predict --model hf-hub:org/name --input photos/ --out predictions --max-size 1024 --npy
  mtv-predict --model runs/nyud_hps/model --input photo.jpg --out predictions --tasks depth --no-key
  mtv-predict --model runs/synthetic_controllable/model --input photo.jpg --out predictions --budget 2.5 --preference semseg=2 depth=1

For each image <name> and task <task> it writes <name>_<task>.png (the map with its key: class legend,
depth colour bar in metres, normals colour sphere, 0..1 heat scale), with --panel <name>_panel.png
(the image and every task in one row) and with --npy <name>_<task>.npy (the decoded map).
--budget and --preference (controllable models) pick the sub-network to run, without retraining."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-predict",
        description="Predict every task of a pretrained model for images; write pictures with legends and scales.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="pretrained folder (config.json + model.safetensors) or hf-hub:org/name")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to predict (default: all of the model's)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="shrink images whose longer side is larger to this many pixels first; maps come back "
                        "at the image's size (bounds time and memory for large photos)")
    parser.add_argument("--npy", action="store_true", help="also write the decoded maps as <image>_<task>.npy")
    parser.add_argument("--panel", action="store_true", help="also write <image>_panel.png (input and all tasks)")
    parser.add_argument("--no-key", action="store_true", help="per-task PNGs without legend or scale (plain colour maps)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--budget", type=float, default=None, metavar="GFLOPS",
                        help="controllable models: compute budget in GFLOPs per image (at its network input size)")
    parser.add_argument("--preference", nargs="+", default=None, metavar="TASK=W",
                        help="controllable models: task preference weights, e.g. semseg=2 depth=1 (unnamed tasks: 0)")
    return parser


def find_images(path: Path) -> list[Path]:
    """`path` itself, or the image files directly inside folder `path` (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [path] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    images = find_images(args.input)
    if not images:
        print(f"mtv-predict: no images found at {args.input} (looked for {', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
        return USAGE
    if args.batch_size < 1:
        print("mtv-predict: --batch-size must be >= 1", file=sys.stderr)
        return USAGE
    if args.max_size is not None and args.max_size < 1:
        print("mtv-predict: --max-size must be >= 1", file=sys.stderr)
        return USAGE
    try:
        args.preference = parse_preference(args.preference)
    except ValueError as exc:
        print(f"mtv-predict: {exc}", file=sys.stderr)
        return USAGE
    return run_command("mtv-predict", lambda: _run(args, images))


def parse_preference(items: list[str] | None) -> dict[str, float] | None:
    """`["semseg=2", "depth=1"]` -> {"semseg": 2.0, "depth": 1.0} (ValueError for a malformed item)."""
    if items is None:
        return None
    out: dict[str, float] = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            if not sep or not task:
                raise ValueError
            out[task] = float(value)
        except ValueError:
            raise ValueError(f"--preference {item!r} must look like task=weight (e.g. semseg=2)") from None
    return out


def _run(args: argparse.Namespace, paths: list[Path]) -> None:
    import numpy as np
    import torch
    from tqdm import tqdm

    from mtvision import visualize
    from mtvision.errors import UnknownNameError
    from mtvision.inference import ImageError, as_rgb, load, to_uint8

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = load(args.model, device=device, amp=args.amp, batch_size=args.batch_size, max_size=args.max_size)
    try:
        tasks = predictor.model.select_tasks(args.tasks)
    except UnknownNameError as exc:  # a usage error: exit 2
        raise ImageError(str(exc)) from None
    control = {"budget": args.budget, "preference": args.preference}
    if args.budget is not None or args.preference is not None:
        from mtvision.inference import preprocess

        size = preprocess(as_rgb(paths[0]), predictor.preprocess_config, args.max_size).tensor.shape[-2:]
        choice = predictor.select_widths(args.budget, args.preference, size)
        print(f"mtv-predict: sub-network {choice.config.describe()} ({choice.flops / 1e9:.3g} GFLOPs at "
              f"{size[0]}x{size[1]})", file=sys.stderr)
    colorize = {t: predictor.model.tasks[t].colorize for t in tasks}
    names = predictor.class_names
    args.out.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in paths]
    out_names = {p: (p.stem if stems.count(p.stem) == 1 else p.name) for p in paths}  # a.png and a.jpg both kept
    with tqdm(total=len(paths), unit="img", disable=args.no_progress, desc="mtv-predict") as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            pictures = [as_rgb(p, start + i if len(paths) > 1 else None) for i, p in enumerate(chunk)]
            for path, image, result in zip(chunk, pictures, predictor.predict(pictures, tasks=tasks, **control)):
                stem = out_names[path]
                for t in tasks:
                    rgb = visualize.picture(colorize[t], result[t], prediction=True, class_names=names.get(t),
                                            key=not args.no_key)
                    visualize.save_png(str(args.out / f"{stem}_{t}.png"), rgb)
                    if args.npy:
                        np.save(args.out / f"{stem}_{t}.npy", result[t])
                if args.panel:
                    panel = visualize.prediction_panel(
                        to_uint8(image), {t: (colorize[t], result[t]) for t in tasks}, class_names=names
                    )
                    visualize.save_png(str(args.out / f"{stem}_panel.png"), panel)
            bar.update(len(chunk))
    print(f"wrote predictions for {len(paths)} image(s) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
