"""`search(cfg)`: run a branching search (BMTAS or Learning to Branch) and write what it found.

Outputs in `cfg.output_dir`:
    search_config.yaml   the resolved search config
    arch_params.jsonl    one record per epoch: temperature, losses, architecture probabilities and
                         logits, per-stage sharing probabilities, expected FLOPs, the argmax tree
    sharing.png          per stage, P(two tasks share it) against the epoch
    spec.yaml            the branching spec found (within the FLOPs budget when one is set)
    expected_flops.json  expected FLOPs of the sampled tree, FLOPs of the spec, the FLOPs table
    train_config.yaml    the branched training config of the spec, ready for `mtv-train`
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from mtvision import distributed as dist
from mtvision.config import save_config
from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD
from mtvision.engine.data import SeededAugmentation, augmentation, make_dataset, train_indices, train_loader
from mtvision.engine.progress import Progress
from mtvision.engine.run_folder import check_output_dir, prepare_output_dir
from mtvision.errors import MTVisionError
from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.config import ModelConfig
from mtvision.search.bmtas import BMTAS
from mtvision.search.config import SearchConfig, resolved
from mtvision.search.flops import (
    FlopsTable,
    cheapest_flops,
    check_budget,
    costliest_flops,
    format_flops,
    measure,
    spec_flops,
)
from mtvision.search.ltb import LearningToBranch
from mtvision.search.plot import plot_sharing
from mtvision.search.supernet import InverseSqrtTemperature, LinearTemperature, SearchStepper, build_copies, fit_budget


class SearchError(MTVisionError, RuntimeError):
    """A search that cannot run (too little data, an output folder in use, ...)."""


@dataclass
class SearchResult:
    """What a search produced."""

    output_dir: Path
    spec: BranchingSpec
    flops: dict[str, Any]
    history: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------- set-up
def build_search_data(cfg: SearchConfig, holdout: bool, rank: int = 0, world: int = 1, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(weight loader, architecture loader or None, class counts).  The training split minus any
    validation hold-out; with `holdout`, a seeded `search.arch_fraction` of it for the architecture."""
    d, opts = cfg.data, cfg.search
    base = make_dataset(d, d.train_split)
    indices = train_indices(d, len(base))
    tf = augmentation(d, mean, std)
    arch = None
    weight_idx = indices
    if holdout:
        perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(d.seed)).tolist()
        n_arch = max(1, round(len(indices) * opts.arch_fraction))
        if n_arch >= len(indices):
            raise SearchError(f"search.arch_fraction={opts.arch_fraction} of {len(indices)} images leaves none for the weights")
        arch_idx = sorted(indices[i] for i in perm[:n_arch])
        weight_idx = sorted(indices[i] for i in perm[n_arch:])
        arch = train_loader(SeededAugmentation(base, tf, d.seed, arch_idx), opts.batch_size, d, rank, world, salt=1)
    weights = train_loader(SeededAugmentation(base, tf, d.seed, weight_idx), opts.batch_size, d, rank, world, salt=0)
    for name, loader in (("weight", weights), ("architecture", arch)):
        if loader is not None and len(loader) == 0:
            raise SearchError(
                f"the {name} split gives no full batch of {opts.batch_size} per process: use more data.num_samples "
                "or a smaller search.batch_size"
            )
    counts = {t: n for t, n in base.num_classes.items() if t in d.tasks}
    return weights, arch, counts


def model_config(cfg: SearchConfig, num_classes: Mapping[str, int]) -> ModelConfig:
    """The model config of the search's supernet (tasks with the dataset's class counts)."""
    section = cfg.model_section()
    section["decoder_options"] = {**section["decoder_options"], "spec": BranchingSpec.all_shared(cfg.data.tasks, 1).to_dict()}
    section.setdefault("tasks", {t: num_classes.get(t) for t in cfg.data.tasks})
    return ModelConfig.from_dict(section)


# ---------------------------------------------------------------------------------------- the search
def search(
    cfg: SearchConfig, *, overwrite: bool = False, device: str = "auto", on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> SearchResult:
    """Run the search `cfg` (single process or under torchrun) and write its outputs (rank 0)."""
    cfg.validate()
    info = dist.init_distributed(device)
    try:
        with contextlib.ExitStack() as closing:
            return _search(cfg, info, overwrite, on_epoch, closing)
    finally:
        dist.cleanup()


def _search(cfg: SearchConfig, info: dist.DistInfo, overwrite: bool, on_epoch, closing: contextlib.ExitStack) -> SearchResult:
    opts, r, dev = cfg.search, resolved(cfg.search), info.device
    out = Path(cfg.output_dir)
    check_output_dir(out, overwrite=overwrite, resumable=False)
    dist.seed_everything(opts.seed, 0)  # identical supernet weights on every rank
    preprocess = cfg.model.get("preprocess") or {}
    mean, std = preprocess.get("mean", IMAGENET_MEAN), preprocess.get("std", IMAGENET_STD)
    holdout = opts.method == "bmtas"
    weights_data, arch_data, num_classes = build_search_data(cfg, holdout, info.rank, info.world_size, mean, std)
    decoder = build_copies(model_config(cfg, num_classes)).to(dev)
    table = measure(decoder, (cfg.data.height, cfg.data.width))
    tasks = list(decoder.tasks)
    if opts.target_flops is not None:
        check_budget(opts.target_flops, table, tasks)  # BudgetError before any training
    method = BMTAS(decoder) if opts.method == "bmtas" else LearningToBranch(decoder)
    stepper = SearchStepper(
        method, decoder.tasks, weight_lr=opts.weight_lr, weight_decay=opts.weight_decay, arch_lr=r.arch_lr,
        arch_weight_decay=r.arch_weight_decay, loss_weights=opts.loss_weights, resource_weight=r.resource_weight,
        table=table, seed=opts.seed, device=dev,
    )
    schedule = (
        LinearTemperature(r.temperature_initial, r.temperature_final or r.temperature_initial, opts.epochs, r.warmup_epochs)
        if opts.method == "bmtas" else InverseSqrtTemperature(r.temperature_initial)
    )
    prepare_output_dir(out, False, overwrite, info.is_main, resumable=False)
    if info.is_main:
        save_config(cfg, out / "search_config.yaml")
        (out / "arch_params.jsonl").write_text("")
    dist.barrier()
    dist.seed_everything(opts.seed + 1, info.rank)  # per-rank augmentation and dropout randomness

    cap = opts.iterations_per_epoch
    n_weight = min(len(weights_data), cap) if cap else len(weights_data)
    n_arch = 0 if arch_data is None else (min(len(arch_data), cap) if cap else len(arch_data))
    progress = Progress(
        opts.epochs * n_weight, f"search ({opts.method})", mode=opts.console, interval=opts.log_interval,
        enabled=info.is_main, images_per_step=opts.batch_size * info.world_size,
    )
    closing.callback(progress.close)
    if info.is_main:
        progress.write(
            f"mtv-search {opts.method}: {tasks} | {decoder.spec.backbone} in {decoder.spec.num_stages} stages | "
            f"{opts.epochs} epochs x {n_weight} weight steps{f' + {n_arch} architecture steps' if n_arch else ''} | "
            f"trees from {format_flops(cheapest_flops(table, tasks))} to {format_flops(costliest_flops(table, tasks))} | "
            f"{info.world_size} process(es) on {dev} | output {out}"
        )
    history: list[dict[str, Any]] = []
    method.net.train()
    for epoch in range(opts.epochs):
        warmup = epoch < r.warmup_epochs
        tau = schedule(epoch)
        arch_losses: list[float] = []
        resources: list[float] = []
        if arch_data is not None and not warmup:
            stepper.reset_arch_optimizer()
            arch_data.sampler.sampler.set_epoch(epoch)
            for batch in islice(arch_data, n_arch):
                images, targets = _to(batch, tasks, dev)
                res = stepper.arch_step(images, targets, tau)
                arch_losses.append(sum(res.losses.values()))
                if res.resource is not None:
                    resources.append(res.resource)
            stepper.reset_weight_optimizer()
        sums: dict[str, float] = {}
        weights_data.sampler.sampler.set_epoch(epoch)
        for batch in islice(weights_data, n_weight):
            images, targets = _to(batch, tasks, dev)
            res = stepper.weight_step(images, targets, tau, warmup)
            for t, v in res.losses.items():
                sums[t] = sums.get(t, 0.0) + v / n_weight
            progress.update(1, loss=sum(res.losses.values()), tau=tau, epoch=epoch)
        record = _record(method, table, epoch, tau, warmup, sums, arch_losses, resources)
        history.append(record)
        if info.is_main:
            with open(out / "arch_params.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if on_epoch is not None:
            on_epoch(record)
    progress.close()
    return _finish(cfg, method, table, history, out, info)


def _to(batch: Mapping[str, Any], tasks, dev: torch.device):
    return batch["image"].to(dev, non_blocking=True), {t: batch[t].to(dev, non_blocking=True) for t in tasks}


def _record(method, table: FlopsTable, epoch: int, tau: float, warmup: bool, losses, arch_losses, resources) -> dict[str, Any]:
    flops = method.expected_flops(table)
    return {
        "epoch": epoch,
        "temperature": tau,
        "warmup": warmup,
        "losses": losses,
        "arch_loss": sum(arch_losses) / len(arch_losses) if arch_losses else None,
        "resource_loss": sum(resources) / len(resources) if resources else None,
        "probabilities": [p.detach().cpu().tolist() for p in method.probabilities()],
        "logits": [a.detach().cpu().tolist() for a in method.arch],
        "sharing": [s.tolist() for s in method.sharing()],
        "expected_flops": flops["expected_flops"],
        "expected_copies": flops["expected_copies"],
        "spec": method.derive().to_dict()["stages"],
    }


def _finish(cfg: SearchConfig, method, table: FlopsTable, history, out: Path, info: dist.DistInfo) -> SearchResult:
    opts = cfg.search
    found = method.derive()
    spec = found if opts.target_flops is None else fit_budget(found, method.sharing(), table, opts.target_flops)
    flops = method.expected_flops(table)
    flops.update({
        "argmax_spec_flops": spec_flops(found, table),
        "spec_flops": spec_flops(spec, table),
        "budget": opts.target_flops,
        "cheapest_flops": cheapest_flops(table, method.tasks),
        "costliest_flops": costliest_flops(table, method.tasks),
        "table": {"input_size": list(table.input_size), "stages": list(table.stages), "heads": dict(table.heads)},
        "units": "FLOPs per image, 2 per multiply-add (torch FlopCounterMode)",
    })
    if info.is_main:
        spec.save(out / "spec.yaml")
        (out / "expected_flops.json").write_text(json.dumps(flops, indent=2) + "\n", encoding="utf-8")
        save_config(cfg.experiment(spec.to_dict()), out / "train_config.yaml")
        plot_sharing(history, method.tasks, out / "sharing.png")
        print(
            f"\nbranching spec ({format_flops(flops['spec_flops'])} per image; expected "
            f"{format_flops(flops['expected_flops'])} under the final architecture distribution):\n{spec.describe()}\n"
            f"written: {out / 'spec.yaml'}, {out / 'train_config.yaml'} (mtv-train {out / 'train_config.yaml'}), "
            f"{out / 'sharing.png'}, {out / 'arch_params.jsonl'}, {out / 'expected_flops.json'}",
            flush=True,
        )
    dist.barrier()
    return SearchResult(out, spec, flops, history)
