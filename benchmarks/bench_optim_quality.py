"""Δm% of loss-weighting and gradient-calibration methods (or of decoders) on the synthetic scenes.

    python benchmarks/bench_optim_quality.py [--seeds 0 1 2] [--jobs 2] [--out runs/optim_quality]
    python benchmarks/bench_optim_quality.py --suite decoders --seeds 0

Every run is `mtv-train` on the main job's config (`configs/synthetic/hps_resnet18_128x160.yaml`,
ResNet-18 HPS, semseg/depth/normals/edge) shortened by `--overrides` to a fixed, smaller budget; the
single-task references are HPS runs with one task on the same budget and seeds.  Δm% uses each
task's primary metric (mIoU, depth RMSE, normals mean angle, edge odsF) on the test split, against
the mean over seeds of the single-task runs; positive is better (DESIGN.md's sign).  Runs that
already finished are reused, so the script can be stopped and started again.  Prints a markdown
table: mean ± standard error over the seeds, the paired difference to EW on the same seeds (same
initialisation and data order, so most of the seed noise cancels), the per-task metrics and the
tasks left below their single-task run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtvision.metrics.delta import delta_m
from mtvision.tasks import get_task

CONFIG = "configs/synthetic/hps_resnet18_128x160.yaml"
TASKS = ["semseg", "depth", "normals", "edge"]
BUDGET = [  # 2/5 of the main job's steps at 96x128 (about 1/4 of its compute); one validation, at the end
    "data.height=96", "data.width=128", "data.num_samples={train: 1600, val: 32, test: 100}",
    "data.num_workers=0", "train.iterations=200", "train.eval_interval=200", "optim.warmup_iters=20",
    "logging.console=plain", "logging.log_interval=100", "logging.num_val_images=0",
]
METHODS = {  # name -> overrides
    "EW": [],
    "UW": ["optim.weighting.method=uw"],
    "DWA": ["optim.weighting.method=dwa"],
    "GradNorm": ["optim.weighting.method=gradnorm"],
    "FAMO": ["optim.weighting.method=famo"],
    "MGDA": ["optim.calibration.method=mgda"],
    "PCGrad": ["optim.calibration.method=pcgrad"],
    "CAGrad": ["optim.calibration.method=cagrad"],
    "IMTL-G": ["optim.calibration.method=imtl_g"],
    "Nash-MTL": ["optim.calibration.method=nash_mtl"],
    "Aligned-MTL": ["optim.calibration.method=aligned_mtl"],
    "FairGrad": ["optim.calibration.method=fairgrad"],
    "SDMGrad": ["optim.calibration.method=sdmgrad"],
    "NTKMTL": ["optim.calibration.method=ntkmtl"],
    "Nash-MTL (every 10)": ["optim.calibration.method=nash_mtl", "optim.calibration.options={update_weights_every: 10}"],
    "STCH": ["optim.weighting.method=stch"],
    "GO4Align": ["optim.weighting.method=go4align"],
    "DB-MTL": ["optim.calibration.method=db_mtl", "optim.calibration.level=params"],
    "MoCo": ["optim.calibration.method=moco", "optim.calibration.level=params"],
    "ExcessMTL": ["optim.calibration.method=excess_mtl", "optim.calibration.level=params"],
}

DECODERS = {  # name -> overrides (same budget, EW, no calibration)
    "HPS": [],
    "cross-stitch": ["model.decoder=cross_stitch"],
    "PAD-Net": ["model.decoder=padnet"],
    "MTI-Net": ["model.decoder=mtinet"],
    "InvPT (128 ch)": ["model.decoder=invpt", "model.decoder_options={task_channels: 128, prediction_channels: 32}"],
    "MMoE": ["model.decoder=mmoe", "model.decoder_options={num_experts: 8, expert_channels: 64}"],
    "TaskExpert": ["model.decoder=taskexpert"],
    "TaskExpert + balance (0.01)": ["model.decoder=taskexpert", "model.decoder_options={balance_weight: 0.01}"],
    "M3ViT (ViT-Tiny)": [
        "model.backbone={name: vit_tiny_patch16_224, kwargs: {img_size: [96, 128], dynamic_img_size: true}}",
        "model.decoder=m3vit",
    ],
    "TaskPrompter (ViT-Tiny)": [  # read-outs at the token width, then HPS's neck and head widths (defaults: 768)
        "model.backbone={name: vit_tiny_patch16_224, kwargs: {img_size: [96, 128], dynamic_img_size: true}}",
        "model.decoder=taskprompter",
        "model.decoder_options={feature_channels: 192, embed_channels: 128, head_channels: 64}",
    ],
    "HPS (ViT-Tiny)": [  # the same-backbone baseline of the ViT rows
        "model.backbone={name: vit_tiny_patch16_224, kwargs: {img_size: [96, 128], dynamic_img_size: true}}",
    ],
    "DSMTL": ["model.decoder=dsmtl"],  # joint learning, learned gates (configs/synthetic/dsmtl_resnet18_128x160.yaml)
    "DSMTL-IL": ["model.decoder=dsmtl", "model.decoder_options={strategy: individual}"],
    "DSMTL-compact": ["model.decoder=dsmtl", "model.decoder_options={search: true}"],  # eval runs only the kept copies
}


RESCORED = "metrics_rescored.json"  # the test split scored again with today's metric code (--rescore)


def rescore(run: Path) -> None:
    """Score a finished run's model on its test split again with `mtv-eval` (today's metric code), into
    RUN/metrics_rescored.json, which `test_metrics` then prefers: runs made while a metric changed
    are then compared on one definition."""
    if (run / RESCORED).is_file():
        return
    cmd = [sys.executable, "-m", "mtvision.cli.evaluate", str(run), "--split", "test", "--out", str(run / RESCORED),
           "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mtv-eval of {run} failed: {proc.stderr.strip().splitlines()[-1:]}")


def test_metrics(run: Path) -> dict[str, dict[str, float]] | None:
    """The test-split metrics of a finished run (None when it has not finished): the rescored ones
    when present, else those the run logged."""
    log = run / "metrics.jsonl"
    if not (run / "model" / "model.safetensors").is_file() or not log.is_file():
        return None
    if (run / RESCORED).is_file():
        return json.loads((run / RESCORED).read_text())["metrics"]
    out: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.startswith("test/"):
                _, task, metric = key.split("/", 2)
                out.setdefault(task, {})[metric] = value
    return out or None


def run(name: str, overrides: list[str], out: Path, config: str = CONFIG) -> dict[str, dict[str, float]]:
    """`mtv-train config` at the fixed budget with `overrides` into `out` (reused when finished)."""
    done = test_metrics(out)
    if done is not None:
        return done
    cmd = [sys.executable, "-m", "mtvision.cli.train", config, *BUDGET, *overrides, f"output_dir={out}", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out.parent / f'{out.name}.log'}")
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    metrics = test_metrics(out)
    if metrics is None:
        raise RuntimeError(f"{name} wrote no test metrics")
    return metrics


def run_all(jobs: dict[tuple[str, int], tuple[list[str], Path, str]], workers: int) -> dict:
    """`run` every (name, seed) -> (overrides, folder, config) job, `workers` at a time; exits with
    the list of failures (finished runs are kept and reused next time) when any run fails."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(run, f"{key[0]} seed {key[1]}", *job) for key, job in jobs.items()}
        results, failed = {}, []
        for key, f in futures.items():
            try:
                results[key] = f.result()
            except RuntimeError as exc:
                failed.append(str(exc))
    if failed:
        sys.exit("some runs failed (run the script again to retry them):\n" + "\n".join(failed))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/optim_quality")
    parser.add_argument("--suite", choices=["optim", "decoders"], default="optim")
    parser.add_argument("--methods", nargs="+", default=None, help="names from the suite (default: all)")
    parser.add_argument("--rescore", action="store_true",
                        help="score every finished run's test split again with today's metric code (mtv-eval) first")
    args = parser.parse_args()
    suite = METHODS if args.suite == "optim" else DECODERS
    args.methods = args.methods or list(suite)
    root = Path(args.out)
    jobs: dict[tuple[str, int], tuple[list[str], Path]] = {}
    for seed in args.seeds:
        for task in TASKS:
            weights = "{edge: 50.0}" if task == "edge" else "{}"
            jobs[(f"single-{task}", seed)] = (
                [f"data.tasks=[{task}]", f"optim.loss_weights={weights}", f"train.seed={seed}"], root / f"single-{task}-s{seed}"
            )
        for method in args.methods:
            folder = method if args.suite == "optim" else "decoder-" + (  # the whole name where first words clash
                "-".join(w.strip("()") for w in method.split() if w != "+")
                if sum(m.split(" ")[0] == method.split(" ")[0] for m in suite) > 1 else method.split(" ")[0]
            )
            folder = "EW" if method == "HPS" else folder  # the same run as the optimiser suite's EW
            jobs[(method, seed)] = ([*suite[method], f"train.seed={seed}"], root / f"{folder}-s{seed}")
    print(f"{len(jobs)} runs, {args.jobs} at a time, in {root}", flush=True)
    results = run_all({key: (ov, out, CONFIG) for key, (ov, out) in jobs.items()}, args.jobs)
    if args.rescore:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(rescore, [out for _, out in jobs.values()]))
        results = {key: test_metrics(out) for key, (_, out) in jobs.items()}

    primary = {t: get_task(t).primary_metric for t in TASKS}
    higher = {t: get_task(t).new_meter().higher_is_better for t in TASKS}
    refs = {t: {primary[t]: statistics.mean(results[(f"single-{t}", s)][t][primary[t]] for s in args.seeds)} for t in TASKS}
    print("\nsingle-task references (mean over seeds): " + ", ".join(f"{t} {primary[t]} {refs[t][primary[t]]:.4g}" for t in TASKS))
    header = (f"| {'method' if args.suite == 'optim' else 'decoder'} | Δm% (mean ± se) | Δm% − EW's, paired (mean ± se) | "
              + " | ".join(f"{t} {primary[t]}" for t in TASKS) + " | tasks below single-task |")
    print("\n" + header + "\n|" + "---|" * (len(TASKS) + 4))
    n = len(args.seeds)
    base = "EW" if "EW" in args.methods else None

    def se(values: list[float]) -> float:
        return statistics.stdev(values) / n**0.5 if n > 1 else float("nan")

    def delta(method: str, seed: int) -> float:
        return delta_m({t: results[(method, seed)][t] for t in TASKS}, refs, primary, higher)

    for method in args.methods:
        per_seed = [results[(method, s)] for s in args.seeds]
        deltas = [delta(method, s) for s in args.seeds]
        paired = [delta(method, s) - delta(base, s) for s in args.seeds] if base else []
        cells = [f"{statistics.mean(m[t][primary[t]] for m in per_seed):.4g}" for t in TASKS]
        below = [t for t in TASKS if (statistics.mean(m[t][primary[t]] for m in per_seed) - refs[t][primary[t]]) * (1 if higher[t][primary[t]] else -1) < 0]
        paired_cell = f"{statistics.mean(paired):+.2f} ± {se(paired):.2f}" if paired and method != base else "—"
        print(f"| {method} | {statistics.mean(deltas):+.2f} ± {se(deltas):.2f} | {paired_cell} | " + " | ".join(cells)
              + f" | {len(below)} ({', '.join(below) or 'none'}) |")


if __name__ == "__main__":
    main()
