"""Inference throughput: one all-task predictor against T single-task predictors of the same backbone.

    python benchmarks/bench_inference.py [--backbone resnet18] [--height 288 --width 384] [--batch 4]
    python benchmarks/bench_inference.py --device cuda --amp --channels-last     # on a GPU (bf16)

Images/s count whole `Predictor.predict` calls (preprocessing, forward, resize and decode of every
task) on random uint8 images.  The measurements of the all-task predictor, the single-task
predictors and the all-task predictor asked for one task are interleaved, and the median of the
repeats is reported, so that load from other processes hits all of them alike.
Goal: all-task HPS at T = 3 at least 2.2x the throughput of the T single-task models together.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mtvision.inference import Predictor  # noqa: E402
from mtvision.models import create_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--decoder", default="hps")
    parser.add_argument("--tasks", nargs="+", default=["semseg", "depth", "normals"])
    parser.add_argument("--semseg-classes", type=int, default=40)
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4, help="images per predict call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each predictor")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def make_predictor(args: argparse.Namespace, tasks: list[str]) -> Predictor:
    spec = {t: (args.semseg_classes if t in ("semseg",) else None) for t in tasks}
    model = create_model(
        backbone={"name": args.backbone, "channels_last": args.channels_last}, decoder=args.decoder, tasks=spec
    )
    return Predictor(model, device=args.device, amp=args.amp, batch_size=args.batch, channels_last=args.channels_last)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.batch)]
    joint = make_predictor(args, args.tasks)
    singles = [make_predictor(args, [t]) for t in args.tasks]
    one = args.tasks[min(1, len(args.tasks) - 1)]
    runs = {
        "all_tasks": lambda: joint.predict(images),
        "single_task_models": lambda: [p.predict(images) for p in singles],
        f"all_task_model_{one}_only": lambda: joint.predict(images, tasks=[one]),
    }
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "backbone": args.backbone,
        "decoder": args.decoder,
        "tasks": args.tasks,
        "size": f"{args.height}x{args.width}",
        "batch": args.batch,
        "amp_bf16": args.amp and args.device.startswith("cuda"),
        "channels_last": args.channels_last,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "speedup_all_vs_singles": round(ips["all_tasks"] / ips["single_task_models"], 2),
    }
    print(json.dumps(result, indent=2))
    print(
        f"| {result['date'][:10]} | {result['device']} | {args.backbone} {args.decoder} T={len(args.tasks)} "
        f"{result['size']} b{args.batch} | {ips['all_tasks']:.2f} | {ips['single_task_models']:.2f} | "
        f"{result['speedup_all_vs_singles']:.2f}x |"
    )
    return result


if __name__ == "__main__":
    main()
