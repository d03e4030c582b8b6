"""Step time of every gradient-calibration method at both levels, against equal weighting, side by side.

    python benchmarks/bench_calibration.py [--tasks 3 5] [--repeats 5] [--batch 8] [--size 128x160]

One step = forward, `MultiTaskObjective.backward`, AdamW step, on a ResNet-18 HPS model and a fixed
synthetic batch (no data loading).  The methods run round-robin, one step each per round in a
shuffled order (seeded), so that machine noise and allocator state hit all of them alike; the
figure is each method's median step time over the rounds divided by the median of plain EW (one
backward pass of the summed loss) from the same rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch

from mtvision.data.synthetic import SyntheticScenes
from mtvision.engine.objective import build_objective, compute_losses
from mtvision.models.registry import create_model

ALL_TASKS = ["semseg", "depth", "normals", "edge", "saliency"]
METHODS = ["ew", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "nash_mtl_every_10", "aligned_mtl", "upgrad", "gradvac",
           "graddrop", "fairgrad", "sdmgrad", "ntkmtl", "db_mtl", "moco", "excess_mtl"]
VARIANTS = {"nash_mtl_every_10": ("nash_mtl", {"update_weights_every": 10})}  # name -> (method, options)
PARAMS_ONLY = ("db_mtl", "moco", "excess_mtl")  # gradient trackers: per-parameter state


def make_batch(n: int, h: int, w: int, tasks: list[str]) -> dict[str, torch.Tensor]:
    scenes = SyntheticScenes(n, h, w, tasks=tasks, seed=0)
    samples = [scenes[i] for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in ["image", *tasks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for t in args.tasks:
        tasks = ALL_TASKS[:t]
        batch = make_batch(args.batch, h, w, tasks)
        torch.manual_seed(0)
        model = create_model(backbone="resnet18", decoder="hps", tasks={n: (10 if n == "semseg" else None) for n in tasks})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        variants = {"plain": build_objective(model, tasks)}
        for level in ("features", "params"):
            for m in args.methods:
                if level == "features" and m in PARAMS_ONLY:
                    continue
                method, options = VARIANTS.get(m, (m, {}))
                variants[f"{m}@{level}"] = build_objective(model, tasks, calibration=method, level=level,
                                                           calibration_options=options)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        rng = random.Random(0)
        for rnd in range(args.repeats + 1):  # round 0 warms up
            rng.shuffle(order)
            for name in order:
                objective = variants[name]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                out = model(batch["image"])
                losses = compute_losses(out.predictions, batch, model.tasks)
                objective.backward(losses, out)
                opt.step()
                if rnd:
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        print(f"\nT = {t} ({', '.join(tasks)}), ResNet-18 HPS, batch {args.batch}, {h}x{w}: plain EW step {base * 1000:.0f} ms")
        print(f"{'method':<20}{'features':>10}{'params':>10}")
        for m in args.methods:
            f = f"{statistics.median(times[f'{m}@features']) / base:>9.2f}x" if f"{m}@features" in times else f"{'—':>10}"
            p = statistics.median(times[f"{m}@params"]) / base
            print(f"{m:<20}{f}{p:>9.2f}x")


if __name__ == "__main__":
    main()
