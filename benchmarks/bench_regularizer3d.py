"""HPS and InvPT, each with and without the 3D-aware regulariser, on the synthetic scenes at the budget
of `benchmarks/bench_optim_quality.py` (whose runs are reused: HPS without the regulariser is its EW
run, InvPT its "InvPT (128 ch)" decoder run).

    python benchmarks/bench_regularizer3d.py [--seeds 0 1 2] [--jobs 2] [--out runs/optim_quality]

Every run's test split is scored with today's metric code (`mtv-eval`, as `--rescore` there); Δm%
against the seed-matched single-task runs of that benchmark; GFLOPs of the saved (inference) model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safe_mtl_table import TASKS, header, model_gflops, row, seeds_parser, single_jobs, train_and_score  # noqa: E402

INVPT = ["model.decoder=invpt", "model.decoder_options={task_channels: 128, prediction_channels: 32}"]
REG = ["model.regularizer3d={channels: 32, hidden: 64, samples: 32, near: 0.1, far: 10.0}"]
ROWS = {  # name -> (config, overrides, run folder prefix)
    "HPS": ("configs/synthetic/hps_resnet18_128x160.yaml", [], "EW"),
    "HPS + 3D-aware regulariser": ("configs/synthetic/hps_resnet18_128x160_3d.yaml", [], "HPS-3D"),
    "InvPT (128 ch)": ("configs/synthetic/hps_resnet18_128x160.yaml", INVPT, "decoder-InvPT"),
    "InvPT (128 ch) + 3D-aware regulariser": ("configs/synthetic/hps_resnet18_128x160.yaml", INVPT + REG, "InvPT-3D"),
}


def main() -> None:
    parser = seeds_parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="names from ROWS (default: all)")
    args = parser.parse_args()
    root = Path(args.out)
    jobs = single_jobs(root, args.seeds)
    for name in args.rows:
        config, overrides, folder = ROWS[name]
        for s in args.seeds:
            jobs[(name, s)] = ([*overrides, f"train.seed={s}"], root / f"{folder}-s{s}", config)
    results, refs = train_and_score(jobs, args.jobs, args.seeds)
    print("\n" + header("model", TASKS))
    for name in args.rows:
        gflops = model_gflops(root / f"{ROWS[name][2]}-s{args.seeds[0]}", 96, 128)
        print(row(name, [results[(name, s)] for s in args.seeds], refs, TASKS, gflops))


if __name__ == "__main__":
    main()
