"""Decoder cost side by side: parameters, FLOPs and eval images/s on one ResNet-18 setting.

    OMP_NUM_THREADS=1 python benchmarks/bench_decoders.py [--decoders hps invpt ...] [--iters 5]

Every decoder runs with its default options on resnet18 (random weights), tasks semseg(10) / depth /
normals / edge, 128 x 160 images, batch 8, eval mode, on the CPU.  FLOPs come from
`torch.utils.flop_counter.FlopCounterMode` (one forward; it counts matmuls and convolutions, not
elementwise ops).  Names that are not registered (e.g. `mtmamba` before it lands) are skipped.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtvision.models import create_model
from mtvision.models.registry import DECODERS

DEFAULT = ("hps", "cross_stitch", "invpt", "padnet", "mtmamba")
TASKS = {"semseg": 10, "depth": None, "normals": None, "edge": None}


def measure(decoder: str, batch: int, height: int, width: int, iters: int) -> dict[str, float]:
    """Parameters (M), GFLOPs per image and eval images/s of `decoder`."""
    torch.manual_seed(0)
    model = create_model(backbone={"name": "resnet18", "pretrained": False}, decoder=decoder, tasks=TASKS).eval()
    x = torch.randn(batch, 3, height, width)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        flops = counter.get_total_flops() / batch / 1e9
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        elapsed = time.perf_counter() - start
    return {"params_m": params, "gflops": flops, "img_s": batch * iters / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoders", nargs="+", default=list(DEFAULT))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); resnet18, tasks {list(TASKS)}, "
          f"{args.height}x{args.width}, batch {args.batch}, eval forward x{args.iters}")
    rows = {}
    for name in args.decoders:
        if name not in DECODERS:
            print(f"skip {name!r}: not registered")
            continue
        rows[name] = measure(name, args.batch, args.height, args.width, args.iters)
    ref = rows.get("hps")
    print(f"{'decoder':<14}{'params (M)':>12}{'GFLOPs/img':>12}{'img/s':>9}{'params x':>10}{'FLOPs x':>9}{'time x':>8}")
    for name, r in rows.items():
        ratios = ("", "", "")
        if ref:
            ratios = (f"{r['params_m'] / ref['params_m']:.2f}", f"{r['gflops'] / ref['gflops']:.2f}", f"{ref['img_s'] / r['img_s']:.2f}")
        print(f"{name:<14}{r['params_m']:>12.2f}{r['gflops']:>12.2f}{r['img_s']:>9.1f}{ratios[0]:>10}{ratios[1]:>9}{ratios[2]:>8}")


if __name__ == "__main__":
    main()
