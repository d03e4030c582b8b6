"""HPS and InvPT, each with and without the 3D-aware regulariser, on the synthetic scenes at the budget
of `benchmarks/bench_optim_quality.py` (whose runs are reused: HPS without the regulariser is its EW
run, InvPT its "InvPT (128 ch)" decoder run).

    python benchmarks/bench_regularizer3d.py [--seeds 0 1 2] [--jobs 2] [--out runs/optim_quality]

Every run's test split is scored with today's metric code (`mtv-eval`, as `--rescore` there); Δm%
against the seed-matched single-task runs of that benchmark; GFLOPs of the saved (inference) model.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_quality import TASKS, rescore, run_all, test_metrics  # noqa: E402
from safe_mtl_table import header, model_gflops, references, row  # noqa: E402

INVPT = ["model.decoder=invpt", "model.decoder_options={task_channels: 128, prediction_channels: 32}"]
REG = ["model.regularizer3d={channels: 32, hidden: 64, samples: 32, near: 0.1, far: 10.0}"]
ROWS = {  # name -> (config, overrides, run folder prefix)
    "HPS": ("configs/synthetic/hps_resnet18_128x160.yaml", [], "EW"),
    "HPS + 3D-aware regulariser": ("configs/synthetic/hps_resnet18_128x160_3d.yaml", [], "HPS-3D"),
    "InvPT (128 ch)": ("configs/synthetic/hps_resnet18_128x160.yaml", INVPT, "decoder-InvPT"),
    "InvPT (128 ch) + 3D-aware regulariser": ("configs/synthetic/hps_resnet18_128x160.yaml", INVPT + REG, "InvPT-3D"),
}


def single_jobs(root: Path, seeds: list[int]) -> dict:
    jobs = {}
    for s in seeds:
        for t in TASKS:
            weights = "{edge: 50.0}" if t == "edge" else "{}"
            jobs[(f"single-{t}", s)] = ([f"data.tasks=[{t}]", f"optim.loss_weights={weights}", f"train.seed={s}"],
                                        root / f"single-{t}-s{s}", ROWS["HPS"][0])
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/optim_quality")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="names from ROWS (default: all)")
    args = parser.parse_args()
    root = Path(args.out)
    jobs = single_jobs(root, args.seeds)
    for name in args.rows:
        config, overrides, folder = ROWS[name]
        for s in args.seeds:
            jobs[(name, s)] = ([*overrides, f"train.seed={s}"], root / f"{folder}-s{s}", config)
    print(f"{len(jobs)} runs, {args.jobs} at a time, in {root}", flush=True)
    run_all(jobs, args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(rescore, [out for _, out, _ in jobs.values()]))
    results = {key: test_metrics(out) for key, (_, out, _) in jobs.items()}
    refs = references({(k[0][len("single-"):], k[1]): v for k, v in results.items() if k[0].startswith("single-")},
                      TASKS, args.seeds)
    print("\n" + header("model", TASKS))
    for name in args.rows:
        gflops = model_gflops(root / f"{ROWS[name][2]}-s{args.seeds[0]}", 96, 128)
        print(row(name, [results[(name, s)] for s in args.seeds], refs, TASKS, gflops))


if __name__ == "__main__":
    main()
