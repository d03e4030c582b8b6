"""Peak memory of one MTMamba++ training step (forward + backward, batch 1) on CPU: old scan vs new.

    OMP_NUM_THREADS=2 python benchmarks/bench_mtmamba_memory.py [--size 224 288] [--scan old new]

The model is the `model` section of the recipe (default configs/nyud/mtmamba_swinl_448x576.yaml:
Swin-L + MTMamba++), with random weights (backbone `pretrained: false`, `weights: null`) and the
NYUD class counts.  Each scan runs in a fresh subprocess; "old" routes SS2D through
`selective_scan_chunked` (autograd through the chunked scan with block checkpointing), "new" through
`selective_scan` (the memory-bounded `selective_scan_recompute` on CPU).  Peak memory is the kernel's
high-water mark of the resident set (VmHWM of /proc/self/status, = ru_maxrss); a watchdog thread ends
the subprocess when its RSS passes `--max-gb`, so that a run never takes down a shared machine.
Autocast follows the recipe's `train.amp` unless `--amp` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "nyud" / "mtmamba_swinl_448x576.yaml"


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _watchdog(limit_kib: int) -> None:
    while True:
        if _status_kib("VmRSS") > limit_kib:
            print(json.dumps({"killed": True, "peak_gib": _status_kib("VmHWM") / 2**20}), flush=True)
            os._exit(3)
        time.sleep(0.02)


def child(args: argparse.Namespace) -> None:
    import torch

    threading.Thread(target=_watchdog, args=(int(args.max_gb * 2**20),), daemon=True).start()
    from mtvision.config import read_config_file
    from mtvision.data.nyud import NUM_CLASSES
    from mtvision.engine.evaluator import autocast_context
    from mtvision.models import create_model
    ss2d = importlib.import_module("mtvision.models.ssm.ss2d")
    scan = importlib.import_module("mtvision.models.ssm.selective_scan")  # the module, not the function

    kind = args.scan[0]  # the child gets one
    if kind == "old":
        ss2d.selective_scan = scan.selective_scan_chunked
    cfg = read_config_file(args.config)
    height, width = args.size or (cfg["data"]["height"], cfg["data"]["width"])
    section = dict(cfg["model"])
    backbone = dict(section["backbone"])
    backbone.update(pretrained=False, weights=None)
    backbone["kwargs"] = {**dict(backbone.get("kwargs") or {}), "img_size": [height, width]}
    section["backbone"] = backbone
    counts = {"semseg": NUM_CLASSES}
    section["tasks"] = {t: counts.get(t) for t in cfg["data"]["tasks"]}
    amp = args.amp or cfg.get("train", {}).get("amp", "none")

    torch.manual_seed(0)
    model = create_model(section).train()
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(1, 3, height, width)
    rss_built = _status_kib("VmRSS")
    start = time.perf_counter()
    with autocast_context(torch.device("cpu"), amp):
        out = model(images)
        loss = sum(v.float().square().mean() for v in out.predictions.values())
    forward_s = time.perf_counter() - start
    rss_forward = _status_kib("VmRSS")  # what autograd keeps for the backward (plus allocator caches)
    loss.backward()
    step_s = time.perf_counter() - start
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    result = {
        "scan": kind, "size": [height, width], "amp": amp, "params_m": params / 1e6,
        "rss_after_build_gib": rss_built / 2**20, "rss_after_forward_gib": rss_forward / 2**20,
        "peak_gib": _status_kib("VmHWM") / 2**20,
        "forward_s": forward_s, "step_s": step_s, "loss": float(loss.detach()), "grads_finite": bool(grads_finite),
    }  # fmt: skip
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the recipe's)")
    parser.add_argument("--scan", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--amp", choices=["none", "bf16"], help="autocast (default: the recipe's train.amp)")
    parser.add_argument("--max-gb", type=float, default=21.0, help="end a subprocess whose RSS passes this (GiB)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"one training step (forward + backward, batch 1) of {Path(args.config).name}, random weights")
    for kind in args.scan:
        cmd = [sys.executable, __file__, "--child", "--config", args.config, "--scan", kind, "--max-gb", str(args.max_gb)]
        cmd += ["--size", *map(str, args.size)] if args.size else []
        cmd += ["--amp", args.amp] if args.amp else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{kind}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1])
        if r.get("killed"):
            print(f"{kind:>4}: stopped by the watchdog at {r['peak_gib']:.2f} GiB RSS (limit {args.max_gb} GiB)")
            continue
        print(
            f"{kind:>4}: {r['size'][0]}x{r['size'][1]} amp={r['amp']} params {r['params_m']:.1f} M | "
            f"RSS after build {r['rss_after_build_gib']:.2f} GiB, after forward {r['rss_after_forward_gib']:.2f} GiB, "
            f"peak {r['peak_gib']:.2f} GiB | "
            f"forward {r['forward_s']:.1f} s, forward+backward {r['step_s']:.1f} s | grads finite {r['grads_finite']}"
        )


if __name__ == "__main__":
    main()
