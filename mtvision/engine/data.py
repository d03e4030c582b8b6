"""Datasets and loaders for a run, built from the data config.

Training augmentation is a pure function of (data seed, epoch, sample index): every sample's
transform is reseeded from those three numbers before it runs.  The data stream is therefore the
same whatever the number of workers, and a resumed run sees exactly the samples and augmentations
an uninterrupted one would have seen.
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
from mtvision.data.transforms import Compose, eval_transforms, train_transforms
from mtvision.errors import DatasetError

SYNTHETIC_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def make_dataset(cfg: DataConfig, split: str, transform: Any = None) -> MultiTaskDataset:
    """The dataset of `split` with `transform` (None: raw samples)."""
    if cfg.dataset == "synthetic":
        from mtvision.data.synthetic import SyntheticScenes

        offset = SYNTHETIC_SPLIT_SEEDS.get(split, 3 + sum(map(ord, split)))
        return SyntheticScenes(
            cfg.num_samples[split], cfg.height, cfg.width, seed=1000 * cfg.seed + offset, tasks=cfg.tasks, transform=transform
        )
    if cfg.dataset == "nyud":
        from mtvision.data.nyud import NYUDv2

        return NYUDv2(cfg.root, split=split, tasks=cfg.tasks, transform=transform)
    from mtvision.data.pascal import PascalContext

    return PascalContext(cfg.root, split=split, tasks=cfg.tasks, transform=transform)


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
    """The three loaders of a run, the training sampler (for epochs and resume) and dataset facts."""

    train: DataLoader
    val: DataLoader
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
    train_tf = train_transforms(
        cfg.height, cfg.width, tuple(cfg.scale_range), cfg.flip, cfg.photometric, mean=mean, std=std
    )
    train_set = make_dataset(cfg, cfg.train_split)
    train_idx = None
    holdout = getattr(cfg, "holdout_fraction", 0.0)
    if holdout > 0:
        train_idx, val_idx = holdout_split(len(train_set), holdout)
        val_set: Dataset = Subset(make_dataset(cfg, cfg.train_split, eval_transforms(cfg.height, cfg.width, mean, std)), val_idx)
    else:
        val_set = make_dataset(cfg, cfg.val_split, eval_transforms(cfg.height, cfg.width, mean, std))
    test_set = make_dataset(cfg, cfg.test_split, eval_transforms(cfg.height, cfg.width, mean, std))
    for name, ds in (("validation", val_set), ("test", test_set)):
        _check_eval_size(ds, cfg.height, cfg.width, name)
    augmented = SeededAugmentation(train_set, train_tf, seed=cfg.seed, indices=train_idx)

    sampler = ResumableSampler(len(augmented), num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    workers = cfg.num_workers
    train_loader = DataLoader(
        augmented,
        batch_size=batch_size,
        sampler=EpochKeyedSampler(sampler),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=cfg.pin_memory,
        drop_last=True,
        worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(loader_seed(cfg.seed, rank)),  # not the global stream: exact resume
    )

    def eval_loader(ds: Dataset) -> DataLoader:
        return build_loader(
            ds, batch_size, shuffle=False, num_workers=min(workers, 2), pin_memory=cfg.pin_memory,
            num_replicas=world_size, rank=rank, pad=False, persistent_workers=False,
        )

    names = getattr(train_set, "class_names", None)
    class_names = {"semseg": list(names)} if names is not None and "semseg" in cfg.tasks else {}
    return RunData(
        train=train_loader,
        val=eval_loader(val_set),
        test=eval_loader(test_set),
        sampler=sampler,
        num_classes={t: n for t, n in train_set.num_classes.items() if t in cfg.tasks},
        meter_info=train_set.meter_info(),
        class_names=class_names,
    )
