"""Trainer overhead and data-loader headroom, measured side by side in one run.

    python benchmarks/bench_train.py [--steps 30] [--batch 8] [--backbone resnet18] [--size 128x160]

1. trainer: `mtvision.engine.trainer.train` for N steps; median step time (from on_step timestamps,
   skipping warm-up steps and steps with an evaluation).
2. bare loop: a hand-written PyTorch loop (forward, per-task losses, sum, backward, AdamW step) over
   the same model config, batch and DataLoader.
3. loader alone: batches/s of the training DataLoader without a model, against the model's
   steps/s on batches already in memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtvision.config import ExperimentConfig, from_dict
from mtvision.engine.data import build_run_data
from mtvision.engine.objective import compute_losses
from mtvision.engine.trainer import build_optimizer, model_config_for, train
from mtvision.models.registry import create_model


def make_config(out: str, steps: int, batch: int, backbone: str, h: int, w: int, workers: int) -> ExperimentConfig:
    return from_dict(
        ExperimentConfig,
        {
            "output_dir": out,
            "data": {"dataset": "synthetic", "tasks": ["semseg", "depth", "normals", "edge"], "height": h, "width": w,
                     "num_samples": {"train": batch * (steps + 5), "val": batch, "test": batch}, "num_workers": workers},
            "model": {"backbone": {"name": backbone}, "decoder": "hps"},
            "optim": {"lr": 1e-3},
            "train": {"iterations": steps, "batch_size": batch, "eval_interval": 10**6},
            "logging": {"console": "plain", "log_interval": 10**6, "num_val_images": 0},
        },
    )


def time_trainer(cfg: ExperimentConfig) -> list[float]:
    stamps: list[float] = []
    train(cfg, on_step=lambda step: stamps.append(time.perf_counter()), device="cpu")
    return [b - a for a, b in zip(stamps, stamps[1:])][3:-1]  # no warm-up, no final evaluation


def time_bare(cfg: ExperimentConfig, steps: int) -> tuple[list[float], float, float]:
    data = build_run_data(cfg.data, cfg.train.batch_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = create_model(model_config_for(cfg, data.num_classes))
    tasks = model.tasks
    opt = build_optimizer(model, cfg)
    data.sampler.set_epoch(0)
    times, cached = [], []
    last = time.perf_counter()
    for i, batch in enumerate(data.train):
        if i >= steps:
            break
        opt.zero_grad(set_to_none=True)
        out = model(batch["image"]).predictions
        losses = compute_losses(out, {t: batch[t] for t in tasks}, tasks)
        sum(losses.values()).backward()
        opt.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if len(cached) < 3:
            cached.append(batch)
    # loader alone
    data.sampler.set_epoch(1)
    t0, n = time.perf_counter(), 0
    for n, _ in enumerate(data.train, 1):
        if n >= steps:
            break
    loader_rate = n / (time.perf_counter() - t0)
    # model alone, on batches in memory
    t0 = time.perf_counter()
    for i in range(steps):
        batch = cached[i % len(cached)]
        opt.zero_grad(set_to_none=True)
        out = model(batch["image"]).predictions
        sum(compute_losses(out, {t: batch[t] for t in tasks}, tasks).values()).backward()
        opt.step()
    model_rate = steps / (time.perf_counter() - t0)
    return times[3:], loader_rate, model_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(str(Path(tmp) / "run"), args.steps, args.batch, args.backbone, h, w, args.workers)
        trainer_times = time_trainer(cfg)
        bare_times, loader_rate, model_rate = time_bare(cfg, args.steps)
    t_med, b_med = statistics.median(trainer_times), statistics.median(bare_times)
    print(f"{args.backbone} HPS, 4 tasks, batch {args.batch}, {h}x{w}, {args.workers} workers")
    print(f"trainer step {t_med * 1000:.0f} ms | bare loop step {b_med * 1000:.0f} ms | ratio {t_med / b_med:.3f}")
    print(f"loader alone {loader_rate:.2f} batches/s | model alone {model_rate:.2f} steps/s | headroom {loader_rate / model_rate:.2f}x")


if __name__ == "__main__":
    main()
