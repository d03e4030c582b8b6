"""Branching search on the synthetic scenes: Δm% against FLOPs of the searched trees and the baselines.

    python benchmarks/bench_branching.py [--seeds 0 1 2] [--jobs 2] [--out runs/branching]

1. Searches: BMTAS (`configs/search/bmtas_resnet18_synthetic.yaml`, shortened for a CPU to 64x80 and
   10 epochs of 12 weight + 12 architecture steps, the first 2 epochs a warm-up that trains each
   task on its own copies (without it the copies are identical and only the resource loss moves the
   architecture), architecture learning rate 0.1 instead of the reference 0.01 (96 architecture
   steps are far fewer than the reference's 160 epochs)) at two FLOPs budgets: `mid` (the reference
   resource weight 0.05, target 2.1 GFLOPs at 64x80) and `low` (resource weight 0.5, target 1.75
   GFLOPs), the trees' range there being 1.50 to 2.66 GFLOPs; and the sanity check `texture`:
   depth, normals and the synthetic `texture` task (the accent-colour mask of the surfaces,
   unrelated to class and geometry) with the reference resource weight and no budget, and again
   without the resource loss.  The check is the order of the splits: the unrelated task should
   leave the shared trunk before depth and normals part.
2. Trainings at `bench_optim_quality.py`'s budget (ResNet-18, 96x128, 200 steps of batch 8, edge loss
   x50, EW): the two searched trees and the all-shared tree with the branched decoder (a neck per
   task); the HPS (one shared neck) and single-task runs are that script's EW and `single-*` runs,
   reused from `--reference` when they exist, trained there otherwise.  Single-task networks are the
   "nothing shared" baseline: a branched tree with every stage separate is the same network.
3. FLOPs per image at 96x128 (`FlopCounterMode`, 2 per multiply-add, the whole model), Δm% against
   the single-task networks (mean over seeds), a markdown table and `--plot` (Δm% against GFLOPs,
   with the baselines' Pareto front).  Finished searches and runs are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_quality import CONFIG as HPS_CONFIG  # noqa: E402
from bench_optim_quality import TASKS, run_all  # noqa: E402

from mtvision.metrics.delta import delta_m  # noqa: E402
from mtvision.models import create_model  # noqa: E402
from mtvision.search import BranchingSpec  # noqa: E402
from mtvision.search.flops import count_flops  # noqa: E402
from mtvision.tasks import get_task  # noqa: E402

SEARCH_CONFIG = "configs/search/bmtas_resnet18_synthetic.yaml"
BRANCHED_CONFIG = "configs/synthetic/branched_resnet18_128x160.yaml"
SEARCH_BUDGET = [
    "data.height=64",
    "data.width=80",
    "search.epochs=10",
    "search.warmup_epochs=2",
    "search.iterations_per_epoch=12",
    "data.num_workers=0",
    "search.console=plain",
    "search.log_interval=12",
    "search.arch_lr=0.1",  # the reference 0.01 moves the logits by at most ~1 in these 96 Adam steps: no decision
]
SEARCHES = {  # name -> overrides
    "mid": ["search.resource_weight=0.05", "search.target_flops=2.1e9"],
    "low": ["search.resource_weight=0.5", "search.target_flops=1.75e9"],
    "texture": ["data.tasks=[depth,normals,texture]", "search.loss_weights={}", "search.resource_weight=0.05"],
    "texture-no-resource": ["data.tasks=[depth,normals,texture]", "search.loss_weights={}", "search.resource_weight=0"],
}
NUM_CLASSES = {"semseg": 10, "texture": 2}
HEIGHT, WIDTH = 96, 128


def search(name: str, root: Path, threads: int = 2) -> Path:
    """Run (or reuse) one search; returns its output folder."""
    out = root / f"search-{name}"
    if (out / "spec.yaml").is_file():
        return out
    cmd = [sys.executable, "-m", "mtvision.cli.search", SEARCH_CONFIG, *SEARCH_BUDGET, *SEARCHES[name],
           f"output_dir={out}", "--overwrite"]  # fmt: skip
    print(f"search {name} ...", flush=True)
    with open(root / f"search-{name}.log", "w") as log:
        proc = subprocess.run(
            cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=log, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        raise RuntimeError(f"search {name} failed; see {root / f'search-{name}.log'}")
    return out


def model_flops(decoder: str, tasks: list[str], options: dict | None = None) -> float:
    """FLOPs of one 96x128 image through a ResNet-18 model (random weights)."""
    model = create_model(
        backbone={"name": "resnet18", "pretrained": False}, decoder=decoder, decoder_options=options or {},
        tasks={t: NUM_CLASSES.get(t) for t in tasks},
    ).eval()  # fmt: skip
    with torch.no_grad():
        return count_flops(model, torch.zeros(1, 3, HEIGHT, WIDTH))


def last_record(folder: Path) -> dict:
    """The search's last epoch record (arch_params.jsonl)."""
    return json.loads((folder / "arch_params.jsonl").read_text().splitlines()[-1])


def sharing_report(folder: Path) -> str:
    """The found tree and, per stage, P(two tasks share it) under the final architecture distribution."""
    spec, sharing = BranchingSpec.load(folder / "spec.yaml"), last_record(folder)["sharing"]
    tasks = spec.tasks
    lines = [spec.describe(), "P(share) per stage, last epoch:"]
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            probs = [stage[i][j] for stage in sharing]
            lines.append(f"  {tasks[i]}+{tasks[j]}: " + " ".join(f"{p:.2f}" for p in probs))
    return "\n".join(lines)


def texture_verdict(folder: Path) -> str:
    """Whether the unrelated task splits off earlier (or is less likely to share) than depth and normals."""
    record, spec = last_record(folder), BranchingSpec.load(folder / "spec.yaml")
    depth, normals, texture = (spec.tasks.index(t) for t in ("depth", "normals", "texture"))

    def split_stage(a: int, b: int) -> int:  # the first stage where tasks a and b use different copies
        ta, tb = spec.tasks[a], spec.tasks[b]
        return next(
            (k for k in range(spec.num_stages) if spec.group_of(ta, k) != spec.group_of(tb, k)), spec.num_stages
        )

    related = split_stage(depth, normals)
    unrelated = min(split_stage(depth, texture), split_stage(normals, texture))
    share = lambda a, b: sum(stage[a][b] for stage in record["sharing"])  # noqa: E731 - expected shared stages
    expected = (share(depth, normals), max(share(depth, texture), share(normals, texture)))
    verdict = (
        "as expected"
        if unrelated < related or (unrelated == related and expected[1] < expected[0])
        else "NOT as expected"
    )
    return (
        f"texture leaves the trunk at stage {unrelated}, depth and normals part at stage {related} "
        f"(stage {spec.num_stages}: never); expected shared stages depth+normals {expected[0]:.2f}, "
        f"texture with either at most {expected[1]:.2f}: {verdict}"
    )


def plot(points: list[tuple[str, float, float, float, bool]], path: Path) -> None:
    """Δm% (± sd over seeds) against GFLOPs: baselines in grey with their Pareto front, searched trees
    in red; points of the same tree share one marker and a joined label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = sorted(((g, d) for _, g, d, _, searched in points if not searched), key=lambda p: (p[0], -p[1]))
    front, best = [], -float("inf")
    for g, d in base:  # cheapest (then best) first: a point is on the front when it beats every cheaper one
        if d > best:
            front.append((g, d))
            best = d
    right = max(g for _, g, _, _, _ in points) * 1.25
    xs, ys = [g for g, _ in front] + [right], [d for _, d in front] + [front[-1][1]]
    ax.step(xs, ys, where="post", color="0.6", linestyle="--", label="baselines' Pareto front")
    merged: dict[tuple[float, float], list] = {}
    for label, g, d, sd, searched in points:
        entry = merged.setdefault((round(g, 3), round(d, 3)), [[], g, d, sd, False])
        entry[0].append(label)
        entry[4] = entry[4] or searched
    for labels, g, d, sd, searched in merged.values():
        colour = "tab:red" if searched else "0.3"
        ax.errorbar([g], [d], yerr=[sd], fmt="o", color=colour, capsize=3, zorder=3)
        ax.annotate(" = ".join(labels), (g, d), textcoords="offset points", xytext=(6, 5), fontsize="small")
    ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlim(min(g for _, g, _, _, _ in points) * 0.8, right)
    ax.set_xlabel("GFLOPs per 96x128 image")
    ax.set_ylabel("Δm% against single-task networks")
    ax.set_title("branched ResNet-18 on the synthetic scenes (mean ± sd over seeds)")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/branching")
    parser.add_argument("--reference", default="runs/optim_quality", help="bench_optim_quality.py's run folder")
    parser.add_argument("--plot", default="benchmarks/branching_pareto.png")
    args = parser.parse_args()
    root, ref_root = Path(args.out), Path(args.reference)
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # 2 cores: two 1-thread searches beat one 2-thread one
        threads = max(1, 2 // args.jobs)
        found = dict(zip(SEARCHES, pool.map(lambda name: search(name, root, threads), SEARCHES)))
    for name in ("texture", "texture-no-resource"):
        print(f"\n## sanity check: an unrelated task ({name})\n" + sharing_report(found[name]), flush=True)
        print(texture_verdict(found[name]), flush=True)

    trees = {"all shared": BranchingSpec.all_shared(TASKS, 4, "resnet18")}
    for name in ("mid", "low"):
        trees[f"BMTAS {name}"] = BranchingSpec.load(found[name] / "spec.yaml")
        print(f"\nBMTAS {name}:\n{sharing_report(found[name])}", flush=True)
    jobs, tree_of = {}, {}
    for seed in args.seeds:
        for task in TASKS:
            weights = "{edge: 50.0}" if task == "edge" else "{}"
            jobs[(f"single-{task}", seed)] = (
                [f"data.tasks=[{task}]", f"optim.loss_weights={weights}", f"train.seed={seed}"],
                ref_root / f"single-{task}-s{seed}",
                HPS_CONFIG,
            )
        jobs[("HPS", seed)] = ([f"train.seed={seed}"], ref_root / f"EW-s{seed}", HPS_CONFIG)
        for label, spec in trees.items():  # the spec inline (saved models rebuild); one run per distinct tree
            digest = hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
            tree_of[label] = digest
            jobs[(digest, seed)] = (
                [f"model.decoder_options.spec={json.dumps(spec.to_dict())}", f"train.seed={seed}"],
                root / f"tree-{digest}-s{seed}",
                BRANCHED_CONFIG,
            )
    print(f"\n{len(jobs)} runs ({args.jobs} at a time; finished ones are reused)", flush=True)
    results = run_all(jobs, args.jobs)

    primary = {t: get_task(t).primary_metric for t in TASKS}
    higher = {t: get_task(t).new_meter().higher_is_better for t in TASKS}
    refs = {
        t: {primary[t]: statistics.mean(results[(f"single-{t}", s)][t][primary[t]] for s in args.seeds)} for t in TASKS
    }
    head = {"neck_channels": 128, "head_channels": 64}
    flops = {
        "single-task networks": sum(model_flops("hps", [t]) for t in TASKS),
        "HPS": model_flops("hps", TASKS),
        **{label: model_flops("branched", TASKS, {**head, "spec": spec.to_dict()}) for label, spec in trees.items()},
    }
    print(
        "\n| model | stage copies | GFLOPs | Δm% (mean ± sd) | " + " | ".join(f"{t} {primary[t]}" for t in TASKS) + " |"
    )
    print("|" + "---|" * (len(TASKS) + 4))
    points = []
    for label in ["single-task networks", "HPS", *trees]:
        if label == "single-task networks":
            per_seed = [{t: results[(f"single-{t}", s)][t] for t in TASKS} for s in args.seeds]
            copies = "4 4 4 4"
        else:
            key = label if label == "HPS" else tree_of[label]
            per_seed = [{t: results[(key, s)][t] for t in TASKS} for s in args.seeds]
            copies = "1 1 1 1" if label == "HPS" else " ".join(str(trees[label].num_copies(k)) for k in range(4))
        deltas = [delta_m(m, refs, primary, higher) for m in per_seed]
        sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        cells = [f"{statistics.mean(m[t][primary[t]] for m in per_seed):.4g}" for t in TASKS]
        gflops = flops[label] / 1e9
        same = [o for o in trees if o != label and label in trees and tree_of[o] == tree_of[label]]
        name = f"{label} (= {same[0]})" if same and label.startswith("BMTAS") else label
        print(
            f"| {name} | {copies} | {gflops:.2f} | {statistics.mean(deltas):+.2f} ± {sd:.2f} | "
            + " | ".join(cells)
            + " |"
        )
        points.append((label, gflops, statistics.mean(deltas), sd, label.startswith("BMTAS")))
    plot(points, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
