"""The GPU figures in one command: every claim the CPU cannot measure, each part in its own process
with its own time cap; a part that fails or runs out of time is recorded as such and the rest run.

    python benchmarks/gpu_suite.py                       # one GPU, at most ~8 minutes
    python benchmarks/gpu_suite.py --device cpu --smoke  # tiny sizes, one iteration of each part (make test)

Parts (written to benchmarks/gpu_results.json and a Markdown table, benchmarks/gpu_results.md):
1. inference: images/s and peak memory at 448x576, batch 8, fp32 / bf16 / bf16 + channels_last /
   bf16 + torch.compile, for HPS ResNet-50, InvPT ViT-B, MTMamba++ Swin-T (pure scan; and mamba_ssm
   when importable) and M3ViT all-task against single-task;
2. training step (ms, peak memory) for HPS ResNet-50 and InvPT ViT-B at batch 4, eager against
   compiled (features-level calibration), and the calibration cost ratios against EW at both levels
   for PCGrad, MGDA, Nash-MTL and UPGrad;
3. the selective scan: the pure-PyTorch scan against the sequential loop (and mamba_ssm), L = 1024
   and 4096, B = 2, D = 192, N = 16, forward and forward + backward;
4. MoE dispatch (grouped, batched) against a dense MLP with the same active parameters, k = 1 and 4;
5. a one-GPU torchrun smoke: `torchrun --nproc_per_node=1 tools/train.py` (NCCL) for 20 steps of the
   main job; it must finish and save a checkpoint.

`mamba_ssm` is not installed by the suite: PyPI has no binary wheel of it (only a source
distribution that needs nvcc and a CUDA build), and the GPU machine has no network; the pure scan
carries MTMamba on its own unless the package is already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("inference", "train_step", "scan", "moe", "torchrun")
CAPS = {"inference": 170, "train_step": 150, "scan": 60, "moe": 40, "torchrun": 90}  # seconds, ~8 min in all


# ------------------------------------------------------------------------------------ helpers
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _sizes(smoke: bool) -> dict:
    if smoke:
        return {"hw": (64, 64), "batch": 2, "train_batch": 2, "repeats": 1, "warmup": 0, "lengths": [64],
                "models": {"hps": ("test_resnet", {}), "invpt": ("test_vit", {"img_size": 64}),
                           "mtmamba++": ("swin_tiny_patch4_window7_224", {"img_size": 64, "depths": (1, 1, 1, 1),
                                                                          "embed_dim": 16, "num_heads": (1, 1, 2, 2),
                                                                          "window_size": 4}),
                           "m3vit": ("test_vit", {"img_size": 64})}}
    return {"hw": (448, 576), "batch": 8, "train_batch": 4, "repeats": 10, "warmup": 3, "lengths": [1024, 4096],
            "models": {"hps": ("resnet50", {}), "invpt": ("vit_base_patch16_384", {"img_size": (448, 576)}),
                       "mtmamba++": ("swin_tiny_patch4_window7_224", {"img_size": (448, 576)}),
                       "m3vit": ("vit_small_patch16_224", {"img_size": (448, 576)})}}


TASKS = {"semseg": 40, "depth": None, "normals": None, "edge": None}


def _model(kind: str, sizes: dict, device: str, **options):
    from mtvision.models.registry import create_model

    name, kwargs = sizes["models"][kind]
    decoder = {"mtmamba++": "mtmamba"}.get(kind, kind)
    backbone = {"name": name, "kwargs": dict(kwargs)}
    return create_model(backbone=backbone, decoder=decoder, tasks=TASKS, **options).to(device)


# ------------------------------------------------------------------------------------ parts
def part_inference(device: str, smoke: bool) -> list[dict]:
    import torch

    sizes = _sizes(smoke)
    h, w = sizes["hw"]
    rows = []
    for kind in ("hps", "invpt", "mtmamba++", "m3vit"):
        model = _model(kind, sizes, device).eval()
        x = torch.randn(sizes["batch"], 3, h, w, device=device)
        variants = {"fp32": (model, False, False), "bf16": (model, True, False),
                    "bf16+channels_last": (model, True, True)}
        if not smoke:
            variants["bf16+compile"] = (torch.compile(model), True, False)
        task_sets = {"all": None, "single": ["depth"]} if kind == "m3vit" else {"all": None}
        for label, (net, bf16, cl) in variants.items():
            for which, tasks in task_sets.items():
                inp = x.contiguous(memory_format=torch.channels_last) if cl else x
                if cl:
                    net = net.to(memory_format=torch.channels_last)

                def run(net=net, inp=inp, bf16=bf16, tasks=tasks):
                    with torch.inference_mode(), torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
                        net(inp, tasks)

                _peak_reset(device)
                try:
                    t = _time(run, device, sizes["repeats"], sizes["warmup"])
                    rows.append({"model": kind, "variant": label, "tasks": which, "img_per_s": sizes["batch"] / t,
                                 "peak_gib": _peak_gib(device)})
                except Exception as exc:  # one variant failing (e.g. compile) leaves the others
                    rows.append({"model": kind, "variant": label, "tasks": which, "error": f"{type(exc).__name__}: {exc}"[:300]})
                if cl:
                    model.to(memory_format=torch.contiguous_format)
        del model
    return rows


def part_train_step(device: str, smoke: bool) -> list[dict]:
    import torch

    from mtvision.engine.objective import build_objective

    sizes = _sizes(smoke)
    h, w = sizes["hw"]
    b = sizes["train_batch"]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = {"semseg": torch.randint(0, 40, (b, h, w), generator=g), "depth": torch.rand(b, 1, h, w, generator=g) + 0.5,
               "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
               "edge": (torch.rand(b, 1, h, w, generator=g) > 0.9).float()}
    batch = {"image": torch.randn(b, 3, h, w, generator=g), **targets}

    def step_fn(model, objective, forward):
        def run():
            objective.step(forward, [batch], 0)
        return run

    for kind in ("hps", "invpt"):
        model = _model(kind, sizes, device).train()
        for label, options, compiled in (("eager EW", {}, False), ("eager features+mgda", {"calibration": "mgda"}, False),
                                         ("compiled features+mgda", {"calibration": "mgda"}, True)):
            if compiled and smoke:
                continue
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            objective = build_objective(model, list(TASKS), optimizer=opt, device=device, **options)
            forward = torch.compile(model) if compiled else model
            _peak_reset(device)
            try:
                t = _time(step_fn(model, objective, forward), device, sizes["repeats"], sizes["warmup"])
                rows.append({"model": kind, "variant": label, "step_ms": 1000 * t, "peak_gib": _peak_gib(device)})
            except Exception as exc:
                rows.append({"model": kind, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
        if kind == "hps":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            base = _time(step_fn(model, build_objective(model, list(TASKS), optimizer=opt, device=device), model),
                         device, sizes["repeats"], sizes["warmup"])
            for method in ("pcgrad", "mgda", "nash_mtl", "upgrad"):
                for level in ("features", "params"):
                    objective = build_objective(model, list(TASKS), calibration=method, level=level, optimizer=opt, device=device)
                    try:
                        t = _time(step_fn(model, objective, model), device, sizes["repeats"], sizes["warmup"])
                        rows.append({"model": kind, "variant": f"{method}@{level}", "ratio_to_ew": t / base})
                    except Exception as exc:
                        rows.append({"model": kind, "variant": f"{method}@{level}", "error": f"{type(exc).__name__}: {exc}"[:300]})
        del model
    return rows


def part_scan(device: str, smoke: bool) -> list[dict]:
    import importlib

    import torch

    ss = importlib.import_module("mtvision.models.ssm.selective_scan")

    sizes = _sizes(smoke)
    B, D, N = 2, 192 if not smoke else 8, 16
    fns = {"sequential": ss.selective_scan_reference,
           "pure": getattr(ss, "selective_scan_recompute", None) or ss.selective_scan_chunked}
    if ss.HAS_MAMBA_SSM and device.startswith("cuda"):
        fns["mamba_ssm"] = ss.selective_scan
    rows = []
    for length in sizes["lengths"]:
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(B, D, length, generator=g), torch.randn(B, D, length, generator=g) - 2.0,
                  -torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1), torch.randn(B, N, length, generator=g),
                  torch.randn(B, N, length, generator=g), torch.ones(D)]
        for backward in (False, True):
            ts = {}
            for name, fn in fns.items():
                args = [t.to(device).requires_grad_(backward) for t in inputs]

                def run(fn=fn, args=args, backward=backward):
                    with torch.set_grad_enabled(backward):
                        y = fn(*args, delta_softplus=True)
                        if backward:
                            y.square().mean().backward()

                repeats = 1 if name == "sequential" and not smoke else sizes["repeats"]
                ts[name] = _time(run, device, repeats, min(sizes["warmup"], 1))
            for name, t in ts.items():
                rows.append({"L": length, "pass": "fwd+bwd" if backward else "fwd", "scan": name, "ms": 1000 * t,
                             "speedup_vs_sequential": ts["sequential"] / t})
    return rows


def part_moe(device: str, smoke: bool) -> list[dict]:
    import torch
    from torch import nn

    from mtvision.models.moe import MoE

    dim, hidden, experts, tokens = (16, 16, 4, 64) if smoke else (384, 384, 16, 8 * 28 * 36)
    repeats = _sizes(smoke)["repeats"]
    rows = []
    for k in (1, 4):
        x = torch.randn(tokens, dim, device=device, requires_grad=True)
        dense = nn.Sequential(nn.Linear(dim, k * hidden), nn.GELU(), nn.Linear(k * hidden, dim)).to(device)
        runs = {"dense": lambda m=dense, x=x: m(x).square().mean().backward()}
        for form in ("grouped", "batched"):
            moe = MoE(dim, hidden, experts, k, dispatch=form).to(device).train()
            with torch.no_grad():
                moe.gate_weight["shared"].normal_(std=0.5)
            runs[form] = lambda m=moe, x=x: m(x).output.square().mean().backward()
        ts = {name: _time(fn, device, repeats, 1) for name, fn in runs.items()}
        for name, t in ts.items():
            rows.append({"k": k, "form": name, "fwd_bwd_ms": 1000 * t, "ratio_to_dense": t / ts["dense"]})
    return rows


def part_torchrun(device: str, smoke: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [f"output_dir={out}", "train.iterations=20" if not smoke else "train.iterations=2",
                     "train.epochs=null", "train.eval_interval=20" if not smoke else "train.eval_interval=2",
                     "logging.console=plain"]
        if smoke:
            overrides += ["data.num_samples={train: 8, val: 2, test: 2}", "data.height=32", "data.width=40",
                          "model.backbone.name=test_resnet", "train.batch_size=2", "data.num_workers=0"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
               str(ROOT / "tools" / "train.py"), str(ROOT / "configs" / "synthetic" / "hps_resnet18_128x160.yaml"),
               *overrides, "--device", "cuda" if device.startswith("cuda") else "cpu"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        saved = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
        return [{"returncode": proc.returncode, "seconds": time.perf_counter() - start, "checkpoints": saved,
                 "ok": proc.returncode == 0 and bool(saved), "tail": (proc.stdout + proc.stderr)[-600:]}]


RUNNERS = {"inference": part_inference, "train_step": part_train_step, "scan": part_scan, "moe": part_moe,
           "torchrun": part_torchrun}


# ------------------------------------------------------------------------------------ driver
def run_part(part: str, device: str, smoke: bool, cap: float) -> dict:
    """One part in its own process, killed at `cap` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--device", device] + (["--smoke"] if smoke else [])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"part": part, "status": "timeout", "cap_s": cap, "seconds": cap}
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"part": part, "status": "failed", "seconds": seconds, "error": (proc.stderr or proc.stdout)[-1500:]}
    return {"part": part, "status": "ok", "seconds": seconds, "rows": json.loads(lines[-1][len("RESULT "):])}


def markdown(results: list[dict], device_name: str) -> str:
    out = [f"GPU suite on {device_name}", ""]
    for r in results:
        out.append(f"### {r['part']} ({r['status']}, {r['seconds']:.0f} s)")
        rows = r.get("rows") or []
        if not rows:
            out += [f"    {r.get('error', '')[-300:]}", ""]
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row if k != "tail"))
        out.append("| " + " | ".join(keys) + " |")
        out.append("|" + "---|" * len(keys))
        for row in rows:
            cells = [f"{row.get(k):.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration of each part")
    parser.add_argument("--part", choices=PARTS, help="run one part in this process (the driver uses it)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results.json"))
    args = parser.parse_args(argv)
    if args.part:
        rows = RUNNERS[args.part](args.device, args.smoke)
        print("RESULT " + json.dumps(rows), flush=True)
        return 0
    import torch

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    results = []
    for part in args.parts:
        cap = CAPS[part] * (3 if args.smoke else 1)
        result = run_part(part, args.device, args.smoke, cap)
        print(f"{part}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        results.append(result)
    payload = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "smoke": args.smoke,
               "results": results}
    out = Path(args.out)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, name) + "\n")
    print(f"written: {out}, {out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
