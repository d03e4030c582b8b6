"""`mtv-predict`: run a pretrained folder on an image or a folder of images and write pictures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mtvision.errors import MTVisionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-predict",
        description="Predict every task of a pretrained model folder for images; write colorized PNGs.",
    )
    parser.add_argument("--model", required=True, type=Path, help="pretrained folder (config.json + model.safetensors)")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to predict (default: all of the model's)")
    parser.add_argument("--npy", action="store_true", help="also write the decoded maps as <image>_<task>.npy")
    parser.add_argument("--panel", action="store_true", help="also write <image>_panel.png (input and all tasks)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def find_images(path: Path) -> list[Path]:
    """`path` itself, or the image files directly inside folder `path` (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [path] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images = find_images(args.input)
    if not images:
        print(f"mtv-predict: no images found at {args.input} (looked for {', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("mtv-predict: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        return _run(args, images)
    except MTVisionError as exc:
        print(f"mtv-predict: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, paths: list[Path]) -> int:
    import torch
    from tqdm import tqdm

    from mtvision import visualize
    from mtvision.data.io import read_image
    from mtvision.inference import load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = load(args.model, device=device, amp=args.amp, batch_size=args.batch_size)
    tasks = predictor.model.select_tasks(args.tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in paths]
    names = {p: (p.stem if stems.count(p.stem) == 1 else p.name) for p in paths}  # a.png and a.jpg both kept
    with tqdm(total=len(paths), unit="img", disable=args.no_progress, desc="mtv-predict") as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            pictures = [read_image(p) for p in chunk]
            for path, image, result in zip(chunk, pictures, predictor.predict(pictures, tasks=tasks)):
                colored = {t: predictor.model.tasks[t].colorize(result[t]) for t in tasks}
                for t, rgb in colored.items():
                    visualize.save_png(str(args.out / f"{names[path]}_{t}.png"), rgb)
                    if args.npy:
                        np.save(args.out / f"{names[path]}_{t}.npy", result[t])
                if args.panel:
                    visualize.save_png(
                        str(args.out / f"{names[path]}_panel.png"), visualize.prediction_panel(image, colored)
                    )
            bar.update(len(chunk))
    print(f"wrote predictions for {len(paths)} image(s) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
