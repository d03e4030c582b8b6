"""DSMTL and DSMTL-compact against the single-task networks, HPS and PAD-Net (the best earlier row) on
the synthetic scenes, at the budget of `benchmarks/bench_optim_quality.py` (whose runs are reused:
`--suite decoders --methods HPS PAD-Net DSMTL-compact DSMTL` trains the same folders).

    python benchmarks/bench_dsmtl.py [--seeds 0 1 2] [--jobs 2] [--out runs/optim_quality]

Every run's test split is scored with today's metric code; Δm% against the seed-matched single-task
runs; GFLOPs per 96x128 image of each saved (eval-mode) model, mean over seeds (DSMTL-compact's
depends on the stages each seed's search kept).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_quality import CONFIG, DECODERS  # noqa: E402
from safe_mtl_table import TASKS, header, model_gflops, row, seeds_parser, single_jobs, train_and_score  # noqa: E402

ROWS = {  # name -> (overrides, run folder prefix)
    "HPS": (DECODERS["HPS"], "EW"),
    "PAD-Net (as released)": (DECODERS["PAD-Net"], "decoder-PAD-Net"),
    "DSMTL (joint learning)": (DECODERS["DSMTL"], "decoder-DSMTL"),
    "DSMTL-compact (searched stages)": (DECODERS["DSMTL-compact"], "decoder-DSMTL-compact"),
}


def main() -> None:
    args = seeds_parser(__doc__).parse_args()
    root = Path(args.out)
    jobs = single_jobs(root, args.seeds)
    for name, (overrides, folder) in ROWS.items():
        for s in args.seeds:
            jobs[(name, s)] = ([*overrides, f"train.seed={s}"], root / f"{folder}-s{s}", CONFIG)
    results, refs = train_and_score(jobs, args.jobs, args.seeds)
    single = sum(model_gflops(out, 96, 128) for key, (_, out, _) in jobs.items()
                 if key[0].startswith("single-") and key[1] == args.seeds[0])
    print("\n" + header("model", TASKS))
    cells = " | ".join(f"{refs[t][next(iter(refs[t]))]:.4g}" for t in TASKS)
    print(f"| single-task networks (4, summed) | 0 (reference) | {cells} | — | {single:.2f} |")
    for name, (_, folder) in ROWS.items():
        gflops = statistics.mean(model_gflops(root / f"{folder}-s{s}", 96, 128) for s in args.seeds)
        print(row(name, [results[(name, s)] for s in args.seeds], refs, TASKS, gflops))


if __name__ == "__main__":
    main()
