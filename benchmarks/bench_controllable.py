"""The controllable (slimmable) model's accuracy-FLOPs trade-off on the synthetic scenes, against slim
networks of the same architecture trained separately at matching uniform widths.

    python benchmarks/bench_controllable.py [--seeds 0 1 2] [--jobs 2] [--out runs/optim_quality]

Budget of `benchmarks/bench_optim_quality.py` (96x128, 200 steps of batch 8, EW, edge loss x50; its
single-task runs are the references).  Per seed: one controllable run
(`configs/synthetic/controllable_resnet18_128x160.yaml`, one random sub-network per step besides the
widest and narrowest), scored by `mtv-tradeoff` at 5 budgets evenly spaced over its range with the
batch-norm statistics the trainer saved (recalibrated per sub-network at the end of training); and
one separately trained network per width w in 0.25, 0.5, 0.75, 1 (`widths: [w]`: encoder and every
decoder at w, no sandwich, no distillation).  Prints the markdown tables and writes
`benchmarks/controllable_tradeoff.png` (Δm% against GFLOPs, mean ± sd over seeds) and its JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safe_mtl_table import TASKS, primary_and_direction, seeds_parser, single_jobs, train_and_score  # noqa: E402

from mtvision.metrics.delta import delta_m  # noqa: E402
from mtvision.tasks import get_task  # noqa: E402

CONFIG = "configs/synthetic/controllable_resnet18_128x160.yaml"
CONTROLLABLE = ["model.decoder_options.num_random=1"]
WIDTHS = [0.25, 0.5, 0.75, 1.0]
HERE = Path(__file__).resolve().parent


def slim(w: float) -> list[str]:
    return [f"model.decoder_options={{widths: [{w}], num_random: 0, kd_weight: 0.0}}"]


def tradeoff(run: Path, refs: Path) -> dict:
    """`mtv-tradeoff` of a finished controllable run (reused when its tradeoff.json exists)."""
    if not (run / "tradeoff.json").is_file():
        cmd = [sys.executable, "-m", "mtvision.cli.tradeoff", str(run), "data.num_workers=0", "--split", "test",
               "--device", "cpu", "--calibrate-batches", "0", "--references", str(refs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mtv-tradeoff of {run} failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads((run / "tradeoff.json").read_text())


def slim_gflops(run: Path) -> float:
    from mtvision.models.pretrained import load_model
    from mtvision.search.controllable import measure_widths

    table = measure_widths(load_model(run / "model", device="cpu"), (96, 128))
    return table.flops(table.widest()) / 1e9


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def plot(points: dict[str, list[tuple[float, list[float]]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (label, series), marker in zip(points.items(), "os"):
        x = [g for g, _ in series]
        y = [statistics.mean(d) for _, d in series]
        err = [statistics.stdev(d) if len(d) > 1 else 0.0 for _, d in series]
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=label)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("GFLOPs per 96x128 image")
    ax.set_ylabel("Δm% vs single-task (higher is better)")
    ax.set_title("controllable model vs separately trained slim networks", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    args = seeds_parser(__doc__).parse_args()
    root = Path(args.out)
    jobs = single_jobs(root, args.seeds)
    for s in args.seeds:
        jobs[("controllable", s)] = ([*CONTROLLABLE, f"train.seed={s}"], root / f"controllable-s{s}", CONFIG)
        for w in WIDTHS:
            jobs[(f"slim {w:g}", s)] = ([*slim(w), f"train.seed={s}"], root / f"slim-w{w:g}-s{s}", CONFIG)
    results, refs = train_and_score(jobs, args.jobs, args.seeds, rescored=lambda key: key[0] != "controllable")
    refs_path = root / "controllable-references.json"
    refs_path.write_text(json.dumps(refs, indent=2))
    with ThreadPoolExecutor(args.jobs) as pool:
        curves = dict(zip(args.seeds, pool.map(lambda s: tradeoff(root / f"controllable-s{s}", refs_path), args.seeds)))
    primary, higher = primary_and_direction(TASKS)
    full = {t: get_task(t).new_meter().higher_is_better for t in TASKS}

    def delta(metrics) -> float:
        return delta_m({t: metrics[t] for t in TASKS}, refs, primary, full)

    cells = " | ".join(f"{t} {primary[t]} {'↑' if higher[t] else '↓'}" for t in TASKS)
    print(f"\nsingle-task references (mean over seeds {args.seeds}): "
          + ", ".join(f"{t} {refs[t][primary[t]]:.4g}" for t in TASKS))
    print(f"\n| budget (GFLOPs) | sub-network chosen (seed {args.seeds[0]}) | GFLOPs | {cells} | Δm% (mean ± sd) |\n|"
          + "---|" * (len(TASKS) + 4))
    record: dict = {"references": refs, "controllable": [], "slim": []}
    series_c = []
    n_points = len(curves[args.seeds[0]]["curves"]["equal"])
    for i in range(n_points):
        pts = [curves[s]["curves"]["equal"][i] for s in args.seeds]
        deltas = [delta(p["metrics"]) for p in pts]
        gflops = statistics.mean(p["gflops"] for p in pts)
        means = {t: statistics.mean(p["metrics"][t][primary[t]] for p in pts) for t in TASKS}
        desc = ", ".join([f"encoder x{pts[0]['config']['encoder']:g}"]
                         + [f"{t} x{w:g}" for t, w in pts[0]["config"]["decoders"].items()])
        print(f"| {statistics.mean(p['budget_gflops'] for p in pts):.3f} | {desc} | {gflops:.3f} | "
              + " | ".join(f"{means[t]:.4g}" for t in TASKS) + f" | {mean_sd(deltas)} |")
        series_c.append((gflops, deltas))
        record["controllable"].append({"gflops": gflops, "delta_m": deltas, "configs": [p["config"] for p in pts],
                                       "metrics": means})
    print(f"\n| separately trained, width | GFLOPs | {cells} | Δm% (mean ± sd) |\n|" + "---|" * (len(TASKS) + 3))
    series_s = []
    for w in WIDTHS:
        runs = [results[(f"slim {w:g}", s)] for s in args.seeds]
        deltas = [delta(r) for r in runs]
        gflops = slim_gflops(root / f"slim-w{w:g}-s{args.seeds[0]}")
        means = {t: statistics.mean(r[t][primary[t]] for r in runs) for t in TASKS}
        print(f"| encoder and decoders x{w:g} | {gflops:.3f} | " + " | ".join(f"{means[t]:.4g}" for t in TASKS)
              + f" | {mean_sd(deltas)} |")
        series_s.append((gflops, deltas))
        record["slim"].append({"width": w, "gflops": gflops, "delta_m": deltas, "metrics": means})
    plot({"controllable (one model, 5 budgets)": series_c, "separately trained slim networks": series_s},
         HERE / "controllable_tradeoff.png")
    (HERE / "controllable_tradeoff.json").write_text(json.dumps(record, indent=2))
    print(f"\nfigure: {HERE / 'controllable_tradeoff.png'}")


if __name__ == "__main__":
    main()
