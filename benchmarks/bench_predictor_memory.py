"""Predictor load test: many `predict` calls of mixed image sizes in one process; peak RSS must not
grow after the warm-up.

    .venv/bin/python benchmarks/bench_predictor_memory.py --calls 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mtvision


def rss_mib() -> float:
    """Current resident set size in MiB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = mtvision.create_model(backbone="resnet18", decoder="hps", tasks={"semseg": 10, "depth": None, "normals": None})
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        predictor = mtvision.load(Path(tmp) / "m")
        rng = np.random.default_rng(0)
        sizes = [(96, 128), (120, 160), (64, 200), (150, 150), (77, 131)]
        samples, start = [], time.perf_counter()
        for i in range(args.calls):
            h, w = sizes[int(rng.integers(len(sizes)))]
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            predictor.predict(image)
            if i + 1 == args.warmup or (i + 1) % 100 == 0:
                samples.append((i + 1, rss_mib()))
        elapsed = time.perf_counter() - start
    after_warmup = [r for n, r in samples if n >= args.warmup]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"calls": args.calls, "seconds": round(elapsed, 1), "rss_mib_after_warmup": after_warmup[0],
                      "rss_mib_end": after_warmup[-1], "rss_growth_mib": after_warmup[-1] - after_warmup[0],
                      "peak_rss_mib": peak, "samples": samples}))


if __name__ == "__main__":
    main()
