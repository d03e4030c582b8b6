"""Batches for training and evaluation: a resumable distributed sampler, collate and worker seeding."""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtvision.errors import DatasetError


class ResumableSampler(Sampler[int]):
    """torch's DistributedSampler, plus mid-epoch resume.

    The epoch order is `torch.randperm(num_samples)` from a generator seeded with `seed + epoch`
    (or `range(num_samples)` without shuffling).  Unless `drop_last`, it is padded by repeating its
    head until divisible by `num_replicas`; with `drop_last` its tail is dropped instead.  Rank `r`
    takes positions `r::num_replicas`.  All of this matches DistributedSampler index for index.

    `pad=False` (evaluation) neither pads nor drops: ranks get at most one sample fewer than each
    other and every sample is seen exactly once, so pooled metrics are exact.

    Resume: `consumed` counts the samples *this rank* has consumed in the current epoch.  The
    training loop calls `advance(len(batch))` after each step (the sampler cannot count itself:
    DataLoader workers prefetch ahead), saves `state_dict()` with the checkpoint, and after
    `load_state_dict` the next iteration skips the consumed samples.  `set_epoch` to another epoch
    resets `consumed`; iterating again after the whole epoch was consumed starts it afresh, so a
    checkpoint taken after an epoch's last step (`remaining == 0`) resumes at the next epoch.
    `len()` is always the full per-rank epoch length.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, num_replicas={num_replicas})")
        if drop_last and num_samples < num_replicas:
            raise ValueError(f"drop_last with {num_samples} samples leaves nothing for {num_replicas} replicas")
        self.dataset_size = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        if not pad and not drop_last:
            self.total_size = num_samples
            self.num_samples = len(range(rank, num_samples, num_replicas))
        else:
            if drop_last:
                per_rank = num_samples // num_replicas
            else:
                per_rank = math.ceil(num_samples / num_replicas)
            self.num_samples = per_rank
            self.total_size = per_rank * num_replicas
        self.epoch = 0
        self.consumed = 0

    def epoch_indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.total_size > len(order):
            repeats = math.ceil(self.total_size / len(order))
            order = (order * repeats)[: self.total_size]
        else:
            order = order[: self.total_size]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.consumed >= self.num_samples:
            self.consumed = 0
        return iter(self.epoch_indices()[self.consumed :])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Samples of the current epoch this rank has still to consume."""
        return self.num_samples - self.consumed

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (and so the order); a different epoch starts from its beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def advance(self, n_samples: int) -> None:
        """Record that this rank consumed `n_samples` more samples of the current epoch."""
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        if self.consumed + n_samples > self.num_samples:
            raise ValueError(
                f"advancing by {n_samples} would pass the end of the epoch "
                f"({self.consumed} of {self.num_samples} samples consumed)"
            )
        self.consumed += n_samples

    def state_dict(self) -> dict[str, int]:
        """{'epoch', 'consumed' (per-rank samples), 'num_replicas'}: plain ints for checkpoints."""
        return {"epoch": self.epoch, "consumed": self.consumed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore `state_dict()` output.

        When the checkpoint came from another number of replicas, the globally consumed count is
        re-divided among this run's replicas (rounding down: a few samples may repeat, none is skipped).
        """
        missing = {"epoch", "consumed"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if epoch < 0 or consumed < 0 or saved_replicas < 1:
            raise ValueError(f"invalid sampler state {dict(state)}")
        if saved_replicas != self.num_replicas:
            consumed = min(consumed * saved_replicas, self.dataset_size) // self.num_replicas
        if consumed > self.num_samples:
            raise ValueError(f"sampler state has {consumed} consumed samples but an epoch has {self.num_samples}")
        self.epoch, self.consumed = epoch, consumed


def _describe(batch: Sequence[Mapping[str, Any]], i: int) -> str:
    meta = batch[i].get("meta")
    return f"{meta['id']!r}" if isinstance(meta, Mapping) and "id" in meta else f"#{i}"


def _stack(key: str, values: list[torch.Tensor], batch: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    first = values[0]
    for i, value in enumerate(values[1:], start=1):
        if value.shape != first.shape or value.dtype != first.dtype:
            raise DatasetError(
                f"cannot batch {key!r}: sample {_describe(batch, 0)} has {tuple(first.shape)} {first.dtype} but "
                f"sample {_describe(batch, i)} has {tuple(value.shape)} {value.dtype}; crop or pad samples "
                "to one size (e.g. RandomCrop / PadTo in the transforms) or use batch_size=1"
            )
    out = None
    if torch.utils.data.get_worker_info() is not None and first.device.type == "cpu":
        # Stack straight into shared memory: the batch then crosses to the main process without a copy.
        storage = first._typed_storage()._new_shared(first.numel() * len(values), device=first.device)
        out = first.new(storage).resize_(len(values), *first.shape)
    return torch.stack(values, 0, out=out)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch dict.

    Tensors and numpy arrays are stacked along a new first dimension, numbers become 1-D tensors,
    `meta` becomes a list of per-sample dicts (untouched), anything else a list.  Every sample must
    have the same keys and, per key, the same shape and dtype.
    """
    if not batch:
        raise DatasetError("cannot collate an empty batch")
    keys = list(batch[0])
    for i, sample in enumerate(batch[1:], start=1):
        if set(sample) != set(keys):
            diff = sorted(set(sample) ^ set(keys))
            raise DatasetError(
                f"cannot batch samples with different keys: {_describe(batch, 0)} and {_describe(batch, i)} "
                f"differ in {diff}"
            )
    out: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in batch]
        first = values[0]
        if key == "meta":
            out[key] = [dict(v) if isinstance(v, Mapping) else v for v in values]
        elif isinstance(first, (torch.Tensor, np.ndarray)):
            out[key] = _stack(key, [torch.as_tensor(v) for v in values], batch)
        elif isinstance(first, (bool, int, float)) and all(type(v) is type(first) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def worker_init_fn(worker_id: int) -> None:
    """Prepare a DataLoader worker: it ignores SIGTERM and SIGINT, and its numpy and python RNGs
    are seeded from torch's per-worker seed.

    Schedulers (Slurm, Kubernetes) and torchrun stop a job by signalling its whole process group:
    the workers leave the stop to the main process, which saves a checkpoint and shuts them down
    (a worker killed by the signal would crash the run instead).  The DataLoader seeds torch with
    `base_seed + worker_id`; numpy and `random` become an explicit function of that seed, so a
    worker's random stream can be replayed from `torch.initial_seed()` alone.  (OpenCV threading
    is off in every process: see `mtvision.cv`.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed()
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))
    random.seed(seed)


def loader_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for the workers' base seed, distinct per (seed, rank)."""
    state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 2,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    persistent_workers: bool | None = None,
    pad: bool = True,
) -> DataLoader:
    """A DataLoader over `dataset` with a `ResumableSampler` (reach it as `loader.sampler`), `collate`
    and `worker_init_fn`.

    `drop_last` drops incomplete batches and makes the sampler drop (rather than pad) the remainder
    that does not divide among replicas.  `pad=False` is for distributed evaluation (see
    ResumableSampler).  Worker seeds derive from (`seed`, `rank`), so they differ across ranks but
    repeat across runs; the sampler's order depends on `seed` only, so it agrees across ranks.
    Persistent workers are seeded once per loader: after a resume their random streams restart.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = ResumableSampler(
        len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last, pad=pad
    )
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    generator = torch.Generator()
    generator.manual_seed(loader_seed(seed, rank))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=worker_init_fn,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
    )
