"""Synthetic scene generator throughput on one core: samples/s and the time of each stage.

    OMP_NUM_THREADS=1 python benchmarks/bench_synthetic.py [--num 200] [--sizes 128x160 256x320]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mtvision.data import synthetic as S  # noqa: E402


def stage_times(num: int, height: int, width: int) -> dict[str, float]:
    """Mean milliseconds per sample of each generation stage."""
    totals = {"scene": 0.0, "camera": 0.0, "render": 0.0, "boundaries": 0.0}
    for index in range(num):
        rng = np.random.default_rng([0, index])
        t0 = time.perf_counter()
        scene = S.make_scene(rng)
        t1 = time.perf_counter()
        cam = S.make_camera(rng, scene, height, width)
        t2 = time.perf_counter()
        view = S.render(scene, cam, height, width, rng)
        t3 = time.perf_counter()
        S.boundaries(view.depth, view.normals_cam, view.instance)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {k: 1000 * v / num for k, v in totals.items()}


def throughput(num: int, height: int, width: int, repeats: int = 3) -> float:
    """Best-of-`repeats` samples/s of `generate` (full samples, all tasks)."""
    S.generate(0, 0, height, width)
    best = 0.0
    for r in range(repeats):
        t = time.perf_counter()
        for index in range(num):
            S.generate(r, index, height, width)
        best = max(best, num / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--sizes", nargs="+", default=["128x160", "256x320"])
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        rate = throughput(args.num, h, w)
        stages = ", ".join(f"{k} {v:.2f} ms" for k, v in stage_times(min(args.num, 100), h, w).items())
        print(f"{h}x{w}: {rate:.0f} samples/s on one core ({stages})")


if __name__ == "__main__":
    main()
