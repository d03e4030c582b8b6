"""Mixture-of-experts costs: MoE dispatch against a dense MLP, and M3ViT single- vs all-task inference.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py [--tokens 4096 --dim 192 --experts 16]
    python benchmarks/bench_moe.py --device cuda                   # on a GPU
    python benchmarks/bench_moe.py --skip-m3vit --dispatch grouped # part (a) only, one dispatch form

(a) `MoE` (E experts of hidden h, top-k) against one dense Linear-GELU-Linear MLP of hidden k·h (the
    same active parameters per token), forward and forward+backward, for k = 4 and k = 1, without a
    capacity limit and with capacity factor 1.25, for each dispatch form asked (`--dispatch`,
    default both "grouped" and "batched", timed in the same interleaved turns, with the same
    weights).  Goal: MoE/dense <= 1.5x.
(b) M3ViT on ViT-Tiny/16 at 128x160 with T = 3 tasks (16 experts, top-4, experts of hidden d):
    FLOPs (torch.utils.flop_counter) of the whole model and of the routed part (the blocks from
    the first MoE block on) for all tasks against one task, and images/s of both.  Goal: the
    single-task routed part <= 1/T + 15% of the all-task routed part.
Timings interleave the compared variants and report the median of the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mtvision.models import create_model  # noqa: E402
from mtvision.models.moe import DISPATCHES, MoE  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-hidden", type=int, default=192)
    parser.add_argument("--top-k", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--tasks", nargs="+", default=["semseg", "depth", "normals"])
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-m3vit", action="store_true")
    parser.add_argument(
        "--dispatch", nargs="+", choices=DISPATCHES, default=["grouped", "batched"], help="MoE dispatch forms (a)"
    )
    return parser


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, callable], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, measured in turns (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class DenseMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def bench_dispatch(args: argparse.Namespace) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=args.device)
    forms = list(dict.fromkeys(args.dispatch))
    for k in args.top_k:
        for cf in (None, 1.25):
            moes = {}
            for form in forms:  # the same seed: the same weights for every form
                torch.manual_seed(0)
                moe = MoE(args.dim, args.expert_hidden, args.experts, k, capacity_factor=cf, dispatch=form)
                with torch.no_grad():  # a trained-looking gate: random, so tokens spread over the experts
                    moe.gate_weight["shared"].normal_(std=0.5)
                moes[form] = moe.to(args.device)
            dense = DenseMLP(args.dim, k * args.expert_hidden).to(args.device)
            xg = x.clone().requires_grad_(True)

            def fwd(module, x=x):
                def run():
                    with torch.no_grad():
                        module(x)

                return run

            def train(module, xg=xg):
                def run():
                    out, aux = module(xg), None
                    if isinstance(module, MoE):
                        out, aux = out.output, out.balance_loss
                    (out.square().mean() + (0 if aux is None else aux)).backward()

                return run

            modules = {**moes, "dense": dense}
            for moe in moes.values():
                moe.eval()
            t_eval = interleaved({n: fwd(m) for n, m in modules.items()}, args.repeats, args.device)
            with torch.no_grad():
                stats = {form: moe(x).stats for form, moe in moes.items()}
            for moe in moes.values():
                moe.train()
            t_train = interleaved({n: train(m) for n, m in modules.items()}, args.repeats, args.device)
            first = stats[forms[0]]
            row = dict(
                top_k=k,
                capacity_factor=cf,
                dense_hidden=k * args.expert_hidden,
                capacity=first.capacity,
                dropped_eval=first.dropped,
                fwd_ms_dense=1e3 * t_eval["dense"],
                train_ms_dense=1e3 * t_train["dense"],
            )
            for form in forms:
                assert stats[form].dropped == first.dropped, "dispatch forms dropped different tokens"
                row[f"fwd_ms_{form}"] = 1e3 * t_eval[form]
                row[f"fwd_ratio_{form}"] = t_eval[form] / t_eval["dense"]
                row[f"train_ms_{form}"] = 1e3 * t_train[form]
                row[f"train_ratio_{form}"] = t_train[form] / t_train["dense"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_m3vit(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    spec = {t: (40 if t == "semseg" else None) for t in args.tasks}
    model = create_model(
        backbone={"name": args.backbone, "kwargs": {"img_size": [args.height, args.width], "dynamic_img_size": True}},
        decoder="m3vit",
        tasks=spec,
    ).to(args.device)
    model.eval()
    backbone = model.decoder.backbone
    images = torch.randn(args.batch, 3, args.height, args.width, device=args.device)
    one = [args.tasks[0]]

    def shared_part():
        x = backbone.embed(images)
        for block in backbone.vit.blocks[: backbone.branch]:
            x = block(x)

    shared = flops(shared_part)
    total_all, total_one = flops(lambda: model(images)), flops(lambda: model(images, tasks=one))
    backbone_all, backbone_one = flops(lambda: backbone(images)), flops(lambda: backbone(images, one))
    routed_all, routed_one = backbone_all - shared, backbone_one - shared

    def run_all():
        with torch.no_grad():
            model(images)

    def run_one():
        with torch.no_grad():
            model(images, tasks=one)

    t = interleaved({"all": run_all, "one": run_one}, args.repeats, args.device)
    result = dict(
        tasks=len(args.tasks),
        batch=args.batch,
        size=[args.height, args.width],
        moe_blocks=backbone.moe_blocks,
        gflops_all=total_all / 1e9,
        gflops_one=total_one / 1e9,
        gflops_ratio=total_one / total_all,
        gflops_shared_prefix=shared / 1e9,
        routed_gflops_all=routed_all / 1e9,
        routed_gflops_one=routed_one / 1e9,
        routed_ratio=routed_one / routed_all,
        routed_goal=1 / len(args.tasks) + 0.15,
        images_per_s_all=args.batch / t["all"],
        images_per_s_one=args.batch / t["one"],
    )
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = dict(
        date=datetime.date.today().isoformat(),
        host=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=args.device,
        dispatch=bench_dispatch(args),
    )
    if not args.skip_m3vit:
        report["m3vit"] = bench_m3vit(args)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
