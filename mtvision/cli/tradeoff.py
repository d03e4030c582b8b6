"""`python tools/controllable_tradeoff.py TARGET`: the accuracy-FLOPs trade-off a trained controllable
model spans.  For each of a few budgets (default: 5, evenly spaced from the narrowest to the widest
sub-network) and each task preference (default: equal; `--favour-each` adds one curve per task with
that task weighted 2 and the others 1), the search (`mtvision/search/controllable.py`) picks a
sub-network, which is evaluated on a split.  Writes `tradeoff.json` (budgets, configurations,
GFLOPs, metrics, Δm% against the widest sub-network or against `--references`; null where a
reference metric is 0) and
`tradeoff.png` (each task's primary metric and Δm% against GFLOPs)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtvision.cli.common import USAGE, find_run_config, parse, run_command
from mtvision.errors import MTVisionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controllable_tradeoff",
        description="Evaluate a controllable model's sub-networks at several FLOPs budgets and plot accuracy against GFLOPs.",
        epilog="examples:\n  python tools/controllable_tradeoff.py runs/synthetic_controllable_resnet18 --split test\n"
        "  python tools/controllable_tradeoff.py runs/x/model --config configs/synthetic/controllable_resnet18_128x160.yaml "
        "--budgets 1.5 2 3 --favour-each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", type=Path, help="run folder (config.yaml + model/) or pretrained folder (give --config)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the experiment config (e.g. data.num_samples=...)")
    parser.add_argument("--config", type=Path, help="experiment YAML (default: the run's config.yaml)")
    parser.add_argument("--split", default="test", help="'test' (default), 'val' or a split name")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, metavar="GFLOPS",
                        help="budgets in GFLOPs per image (default: --num-budgets evenly spaced over the model's range)")
    parser.add_argument("--num-budgets", type=int, default=5, help="default budgets: how many (default 5)")
    parser.add_argument("--preference", nargs="+", default=None, metavar="TASK=W", help="task preference (default: equal)")
    parser.add_argument("--favour-each", action="store_true", help="also one curve per task, weighted 2 against 1")
    parser.add_argument("--references", type=Path, help="single-task metrics JSON for Δm%% (default: the widest sub-network)")
    parser.add_argument("--out", type=Path, help="output folder (default: TARGET)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--calibrate-batches", type=int, default=20, metavar="N",
                        help="recompute each sub-network's batch-norm statistics on N training batches (no "
                        "augmentation) before scoring it (default 20; 0: use the statistics from training)")
    return parser


def default_budgets(low: float, high: float, count: int) -> list[float]:
    """`count` budgets evenly spaced from `low` to `high` (both included)."""
    if count < 1:
        raise ValueError("--num-budgets must be >= 1")
    if count == 1:
        return [high]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def preferences(tasks: Sequence[str], preference: Mapping[str, float] | None, favour_each: bool) -> dict[str, dict[str, float] | None]:
    """Curve label -> preference (None: equal weights)."""
    curves: dict[str, dict[str, float] | None] = {"equal" if preference is None else "preference": preference}
    if favour_each:
        for t in tasks:
            curves[f"favour {t}"] = {s: (2.0 if s == t else 1.0) for s in tasks}
    return curves


def plot_tradeoff(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    primary: Mapping[str, str],
    path: str | Path,
    higher: Mapping[str, Mapping[str, bool]] | None = None,
) -> None:
    """A PNG with one panel per task (its primary metric against GFLOPs) and one of Δm%; `higher`
    (task -> metric -> higher is better) adds the direction to the titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mtvision.atomic import atomic_write_path

    panels = [*primary, "Δm%"]
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    for k, name in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, points in curves.items():
            if name == "Δm%":
                points = [p for p in points if p["delta_m"] is not None]
            x = [p["gflops"] for p in points]
            y = [p["delta_m"] if name == "Δm%" else p["metrics"][name][primary[name]] for p in points]
            ax.plot(x, y, marker="o", markersize=4, label=label)
        if name == "Δm%":
            title = "Δm% vs reference (higher is better)"
            if not any(p["delta_m"] is not None for points in curves.values() for p in points):
                ax.text(0.5, 0.5, "n/a (a reference metric is 0)", ha="center", va="center", transform=ax.transAxes)
        else:
            better = (higher or {}).get(name, {}).get(primary[name])
            title = f"{name} {primary[name]}" + ("" if better is None else " (higher is better)" if better else " (lower is better)")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("GFLOPs per image")
        ax.grid(True, alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    fig.suptitle("accuracy-FLOPs trade-off of the controllable model's sub-networks")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    atomic_write_path(path, lambda p: fig.savefig(p, format="png"))


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    from mtvision.cli.predict import parse_preference

    try:
        args.preference = parse_preference(args.preference)
    except ValueError as exc:
        print(f"controllable_tradeoff: {exc}", file=sys.stderr)
        return USAGE
    from mtvision import distributed as dist

    try:
        return run_command("controllable_tradeoff", lambda: _run(args), args.overrides, "data.num_samples={test: 50}")
    finally:
        dist.cleanup()


def _delta(metrics, references, primary, higher) -> float | None:
    """Δm% of `metrics`, or None where a reference metric is 0 (e.g. an untrained model's mIoU)."""
    from mtvision.metrics.delta import ReferencesError, delta_m

    try:
        return delta_m(metrics, references, primary, higher)
    except ReferencesError as exc:
        if "cannot be divided by" not in str(exc):
            raise
        return None


def _run(args: argparse.Namespace) -> None:
    from mtvision import distributed as dist
    from mtvision.config import ExperimentConfig, load_config
    from mtvision.engine.data import eval_loader, evaluation_set
    from mtvision.engine.evaluator import evaluate
    from mtvision.metrics.delta import load_references
    from mtvision.models.decoders.controllable import recalibrate_batch_norms, use_config
    from mtvision.models.pretrained import load_model
    from mtvision.search.controllable import measure_widths, search_widths

    target = args.target
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    config_path = args.config or find_run_config(target)
    if config_path is None:
        raise MTVisionError(f"no config.yaml found for {target}; pass --config with the experiment YAML")
    cfg = load_config(ExperimentConfig, config_path, args.overrides)
    info = dist.init_distributed(args.device)
    folder = target if (target / "config.json").is_file() else target / "model"
    model = load_model(folder, device=info.device)
    pre = model.config.preprocess
    dataset, split = evaluation_set(cfg.data, args.split, pre.mean, pre.std)
    base = getattr(dataset, "dataset", dataset)
    loader = eval_loader(dataset, args.batch_size or cfg.train.batch_size, cfg.data, info.rank, info.world_size)
    tasks = {t: model.tasks[t] for t in cfg.data.tasks if t in model.tasks}
    primary = {t: task.primary_metric for t, task in tasks.items()}
    higher = {t: task.new_meter().higher_is_better for t, task in tasks.items()}
    table = measure_widths(model, (cfg.data.height, cfg.data.width))
    low, high = table.flops(table.narrowest()) / 1e9, table.flops(table.widest()) / 1e9
    budgets = args.budgets or default_budgets(low, high, args.num_budgets)
    cache: dict[str, dict[str, dict[str, float]]] = {}
    calibration = None
    if args.calibrate_batches > 0:
        train_set, _ = evaluation_set(cfg.data, cfg.data.train_split, pre.mean, pre.std)
        calibration = eval_loader(train_set, args.batch_size or cfg.train.batch_size, cfg.data, info.rank, info.world_size)

    def calibration_images():
        for i, batch in enumerate(calibration):
            if i == args.calibrate_batches:
                return
            yield batch["image"].to(info.device)

    def score(config) -> dict[str, dict[str, float]]:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in cache:
            if calibration is not None:
                recalibrate_batch_norms(model, config, calibration_images(), list(tasks))
            with use_config(config):
                cache[key] = evaluate(model, loader, tasks, base.meter_info(), info.device)
        return cache[key]

    references = load_references(args.references, list(tasks)) if args.references else score(table.widest())
    curves: dict[str, list[dict[str, Any]]] = {}
    for label, pref in preferences(list(tasks), args.preference, args.favour_each).items():
        points = []
        for b in budgets:
            choice = search_widths(table, b * 1e9, pref)
            metrics = score(choice.config)
            points.append({
                "budget_gflops": b, "gflops": choice.flops / 1e9, "config": choice.config.to_dict(),
                "preference": dict(choice.preference), "metrics": metrics,
                "delta_m": _delta(metrics, references, primary, higher),
            })
            if info.is_main:
                print(f"{label:>16} | budget {b:.4g} GFLOPs -> {choice.config.describe()} ({choice.flops / 1e9:.4g} GFLOPs) | "
                      + " | ".join(f"{t} {primary[t]} {metrics[t][primary[t]]:.4g}" for t in tasks)
                      + (f" | Δm {points[-1]['delta_m']:+.2f}%" if points[-1]["delta_m"] is not None else " | Δm n/a"), flush=True)
        curves[label] = points
    if not info.is_main:
        return
    out = args.out or (target if target.is_dir() else target.parent)
    out.mkdir(parents=True, exist_ok=True)
    record = {"target": str(target), "split": split, "input_size": list(table.input_size),
              "range_gflops": [low, high], "reference": str(args.references) if args.references else "widest sub-network",
              "curves": curves}
    (out / "tradeoff.json").write_text(json.dumps(record, indent=2))
    plot_tradeoff(curves, primary, out / "tradeoff.png", higher)
    print(f"trade-off: {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")


if __name__ == "__main__":
    sys.exit(main())
