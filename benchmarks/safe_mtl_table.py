"""Rows of the issue-19 tables (DSMTL, the 3D-aware regulariser, controllable models): Δm% against the
seed-matched single-task runs of `benchmarks/bench_optim_quality.py`, per-task metrics, the tasks left
below single-task, and inference GFLOPs per image of a finished run's saved model."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_quality import CONFIG, TASKS, rescore, run_all, test_metrics  # noqa: E402

from mtvision.metrics.delta import delta_m  # noqa: E402
from mtvision.tasks import get_task  # noqa: E402

Metrics = Mapping[str, Mapping[str, float]]


def seeds_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every issue-19 benchmark takes: --seeds, --jobs, --out."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/optim_quality")
    return parser


def single_jobs(root: Path, seeds: Sequence[int]) -> dict:
    """The single-task reference runs of `benchmarks/bench_optim_quality.py` (same folders)."""
    jobs = {}
    for s in seeds:
        for t in TASKS:
            weights = "{edge: 50.0}" if t == "edge" else "{}"
            jobs[(f"single-{t}", s)] = ([f"data.tasks=[{t}]", f"optim.loss_weights={weights}", f"train.seed={s}"],
                                        root / f"single-{t}-s{s}", CONFIG)
    return jobs


def train_and_score(jobs: Mapping, workers: int, seeds: Sequence[int],
                    rescored: Callable[[tuple], bool] = lambda key: True) -> tuple[dict, dict]:
    """Run (or reuse) every (name, seed) -> (overrides, folder, config) job, score again the test split
    of those `rescored` picks, and return (results by key, single-task references over `seeds`);
    `jobs` must hold `single_jobs`."""
    print(f"{len(jobs)} runs, {workers} at a time", flush=True)
    run_all(dict(jobs), workers)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(rescore, [out for key, (_, out, _) in jobs.items() if rescored(key)]))
    results = {key: test_metrics(out) for key, (_, out, _) in jobs.items()}
    single = {(k[0][len("single-"):], k[1]): v for k, v in results.items() if k[0].startswith("single-")}
    return results, references(single, TASKS, seeds)


def primary_and_direction(tasks: Sequence[str]) -> tuple[dict[str, str], dict[str, bool]]:
    """task -> primary metric, task -> whether higher is better for it."""
    primary = {t: get_task(t).primary_metric for t in tasks}
    return primary, {t: get_task(t).new_meter().higher_is_better[primary[t]] for t in tasks}


def references(single: Mapping[tuple[str, int], Metrics], tasks: Sequence[str], seeds: Sequence[int]) -> dict:
    """The single-task references: each task's primary metric, mean over `seeds` of its single-task run."""
    primary, _ = primary_and_direction(tasks)
    return {t: {primary[t]: statistics.mean(single[(t, s)][t][primary[t]] for s in seeds)} for t in tasks}


def row(name: str, runs: Sequence[Metrics], refs: Mapping, tasks: Sequence[str], gflops: float | None) -> str:
    """A markdown row: name | Δm% mean ± sd over runs | per-task seed means | tasks below | GFLOPs."""
    primary, higher = primary_and_direction(tasks)
    full = {t: {m: h for m, h in get_task(t).new_meter().higher_is_better.items()} for t in tasks}
    deltas = [delta_m({t: r[t] for t in tasks}, refs, primary, full) for r in runs]
    means = {t: statistics.mean(r[t][primary[t]] for r in runs) for t in tasks}
    below = [t for t in tasks if (means[t] - refs[t][primary[t]]) * (1 if higher[t] else -1) < 0]
    sd = f" ± {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else ""
    cost = "—" if gflops is None else f"{gflops:.2f}"
    return (f"| {name} | {statistics.mean(deltas):+.2f}{sd} | " + " | ".join(f"{means[t]:.4g}" for t in tasks)
            + f" | {len(below)} ({', '.join(below) or 'none'}) | {cost} |")


def header(first: str, tasks: Sequence[str]) -> str:
    primary, higher = primary_and_direction(tasks)
    cells = [f"{t} {primary[t]} {'↑' if higher[t] else '↓'}" for t in tasks]
    return (f"| {first} | Δm% (mean ± sd) | " + " | ".join(cells) + " | tasks below single-task | GFLOPs |\n|"
            + "---|" * (len(tasks) + 4))


def model_gflops(run: Path, height: int, width: int) -> float:
    """Inference GFLOPs per height x width image of the run's saved model (all its tasks, eval mode)."""
    from mtvision.models.pretrained import load_model
    from mtvision.search.flops import count_flops

    model = load_model(run / "model", device="cpu").eval()
    with torch.no_grad():
        return count_flops(model, torch.zeros(1, 3, height, width)) / 1e9
