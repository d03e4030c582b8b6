"""HPS with and without the 3D-aware regulariser on the synthetic scenes, at the budget of
`benchmarks/bench_optim_quality.py` (its runs are reused: the EW row is HPS without the regulariser).

    python benchmarks/bench_regularizer3d.py [--seeds 0] [--out runs/optim_quality]

Δm% against the same single-task references as that benchmark (its `single-<task>-s<seed>` runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from mtvision.metrics.delta import delta_m
from mtvision.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_quality import TASKS, run  # noqa: E402

ROWS = {  # name -> (config, overrides, run folder prefix)
    "HPS (EW)": ("configs/synthetic/hps_resnet18_128x160.yaml", [], "EW"),
    "HPS + 3D-aware regulariser": ("configs/synthetic/hps_resnet18_128x160_3d.yaml", [], "HPS-3D"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/optim_quality")
    args = parser.parse_args()
    root = Path(args.out)
    primary = {t: get_task(t).primary_metric for t in TASKS}
    higher = {t: get_task(t).new_meter().higher_is_better for t in TASKS}
    refs_by_seed = {}
    for s in args.seeds:
        for t in TASKS:
            weights = "{edge: 50.0}" if t == "edge" else "{}"
            refs_by_seed[(t, s)] = run(f"single-{t} seed {s}", [f"data.tasks=[{t}]", f"optim.loss_weights={weights}",
                                                                 f"train.seed={s}"], root / f"single-{t}-s{s}")
    refs = {t: {primary[t]: statistics.mean(refs_by_seed[(t, s)][t][primary[t]] for s in args.seeds)} for t in TASKS}
    print("| model | Δm% | " + " | ".join(f"{t} {primary[t]}" for t in TASKS) + " | tasks below single-task |")
    print("|" + "---|" * (len(TASKS) + 3))
    for name, (config, overrides, folder) in ROWS.items():
        results = [run(f"{name} seed {s}", [*overrides, f"train.seed={s}"], root / f"{folder}-s{s}", config) for s in args.seeds]
        deltas = [delta_m({t: r[t] for t in TASKS}, refs, primary, higher) for r in results]
        means = {t: statistics.mean(r[t][primary[t]] for r in results) for t in TASKS}
        below = [t for t in TASKS if (means[t] - refs[t][primary[t]]) * (1 if higher[t] else -1) < 0]
        print(f"| {name} | {statistics.mean(deltas):+.2f} | " + " | ".join(f"{means[t]:.4g}" for t in TASKS)
              + f" | {len(below)} ({', '.join(below) or 'none'}) |")


if __name__ == "__main__":
    main()
