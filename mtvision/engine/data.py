"""Datasets and loaders of a run (training, search and evaluation all build them here).

Training augmentation is a pure function of (data seed, epoch, sample index): every sample's
transform is reseeded from those three numbers before it runs.  The data stream is therefore the
same whatever the number of workers, and a resumed run sees exactly the samples and augmentations
an uninterrupted one would have seen.

Validation is `data.val_split`, or with `data.holdout_fraction` > 0 the last part of the training
split (NYUD-v2 and PASCAL-Context publish no validation split); that part is then left out of
training.  The test split is only ever used for the final report.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mtvision.config import DataConfig
from mtvision.data.base import MultiTaskDataset
from mtvision.data.loader import ResumableSampler, build_loader, collate, loader_seed, worker_init_fn
from mtvision.data.registry import make_dataset
from mtvision.data.transforms import Compose, eval_transforms, train_transforms
from mtvision.errors import DatasetError

__all__ = [
    "EpochKeyedSampler",
    "RunData",
    "SeededAugmentation",
    "augmentation",
    "build_run_data",
    "eval_loader",
    "evaluation_set",
    "holdout_split",
    "make_dataset",
    "train_indices",
    "train_loader",
]


class SeededAugmentation(Dataset):
    """Wraps a dataset whose transform is a `Compose`; items are fetched by (epoch, index) keys and
    the transform is reseeded from (seed, epoch, index) first."""

    def __init__(self, dataset: MultiTaskDataset, transform: Compose, seed: int, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.dataset.transform = transform
        self.transform = transform
        self.seed = seed
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.transform.reseed([self.seed, epoch, index])
        return self.dataset[self.indices[index]]


class EpochKeyedSampler(Sampler):
    """Yields (epoch, index) keys from a ResumableSampler, so that items know their epoch."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for index in self.sampler:
            yield epoch, index

    def __len__(self) -> int:
        return len(self.sampler)


@dataclass
class RunData:
    """The three loaders of a run (no validation loader when the run has no validation split), the
    training sampler (for epochs and resume) and dataset facts."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    sampler: ResumableSampler
    num_classes: dict[str, int]
    meter_info: dict[str, Any]
    class_names: dict[str, list[str]]


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic split of range(n): (kept for training, held out for validation = the last part)."""
    held = max(1, int(round(n * fraction)))
    if held >= n:
        raise ValueError(f"data.holdout_fraction={fraction} leaves no training samples out of {n}")
    return list(range(n - held)), list(range(n - held, n))


def augmentation(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """The training augmentation the data config describes (scale, crop, flip, rotation, photometric)."""
    return train_transforms(
        cfg.height, cfg.width, tuple(cfg.scale_range), cfg.flip, cfg.photometric, mean=mean, std=std,
        rotation=cfg.rotation, cat_max_ratio=cfg.cat_max_ratio,
    )


def train_indices(cfg: DataConfig, size: int) -> list[int]:
    """The training split's samples that are trained on: all, minus the validation hold-out."""
    return holdout_split(size, cfg.holdout_fraction)[0] if cfg.holdout_fraction > 0 else list(range(size))


def evaluation_set(cfg: DataConfig, which: str, mean: Sequence[float], std: Sequence[float]) -> tuple[Dataset, str]:
    """The evaluation dataset `which` ("val", "test" or another split name) with evaluation
    transforms, and a description of it ("train (held-out 10%)" for a hold-out)."""
    tf = eval_transforms(cfg.height, cfg.width, mean, std)
    if which == "val" and cfg.holdout_fraction > 0:
        full = make_dataset(cfg, cfg.train_split, tf)
        return Subset(full, holdout_split(len(full), cfg.holdout_fraction)[1]), f"{cfg.train_split} (held-out {cfg.holdout_fraction:.0%})"
    split = {"val": cfg.val_split, "test": cfg.test_split}.get(which, which)
    return make_dataset(cfg, split, tf), split


def train_loader(
    dataset: SeededAugmentation, batch_size: int, cfg: DataConfig, rank: int = 0, world: int = 1, salt: int = 0
) -> DataLoader:
    """The shuffled, resumable training loader of one process (`loader.sampler.sampler` is the
    `ResumableSampler`); `salt` gives a second loader over the same data its own order."""
    if len(dataset) < world:
        raise DatasetError(f"{len(dataset)} training images cannot be divided among {world} processes")
    seed = cfg.seed + salt
    sampler = ResumableSampler(len(dataset), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochKeyedSampler(sampler),
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=cfg.pin_memory,
        drop_last=True,
        worker_init_fn=worker_init_fn,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(loader_seed(seed, rank)),  # not the global stream: exact resume
    )


def eval_loader(dataset: Dataset, batch_size: int, cfg: DataConfig, rank: int = 0, world: int = 1) -> DataLoader:
    """An evaluation loader: every sample exactly once over the ranks, in order."""
    return build_loader(
        dataset, batch_size, shuffle=False, num_workers=min(cfg.num_workers, 2), pin_memory=cfg.pin_memory,
        num_replicas=world, rank=rank, pad=False, persistent_workers=False,
    )


def _check_eval_size(ds: Dataset, height: int, width: int, name: str) -> None:
    """Evaluation pads images to height x width: fail now, not at the first validation, when the
    first image is larger."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    index = ds.indices[0] if isinstance(ds, Subset) else 0
    h, w = base.load_raw(index)["image"].shape[:2]
    if h > height or w > width:
        raise DatasetError(
            f"{name} images are {h}x{w}, larger than data.height x data.width = {height}x{width}, to which "
            "evaluation pads them: raise data.height/data.width"
        )


def build_run_data(
    cfg: DataConfig, batch_size: int, mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1
) -> RunData:
    """Training, validation and test loaders for one process of a (possibly distributed) run."""
    train_tf = augmentation(cfg, mean, std)
    train_set = make_dataset(cfg, cfg.train_split)
    has_val = cfg.val_split is not None or cfg.holdout_fraction > 0
    val_set = evaluation_set(cfg, "val", mean, std)[0] if has_val else None
    test_set, _ = evaluation_set(cfg, "test", mean, std)
    for name, ds in (("validation", val_set), ("test", test_set)):
        if ds is not None:
            _check_eval_size(ds, cfg.height, cfg.width, name)
    augmented = SeededAugmentation(train_set, train_tf, seed=cfg.seed, indices=train_indices(cfg, len(train_set)))
    loader = train_loader(augmented, batch_size, cfg, rank, world_size)
    names = getattr(train_set, "class_names", None)
    class_names = {"semseg": list(names)} if names is not None and "semseg" in cfg.tasks else {}
    return RunData(
        train=loader,
        val=eval_loader(val_set, batch_size, cfg, rank, world_size) if val_set is not None else None,
        test=eval_loader(test_set, batch_size, cfg, rank, world_size),
        sampler=loader.sampler.sampler,
        num_classes={t: n for t, n in train_set.num_classes.items() if t in cfg.tasks},
        meter_info=train_set.meter_info(),
        class_names=class_names,
    )
