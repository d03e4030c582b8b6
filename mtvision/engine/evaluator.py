"""Evaluation: stream a split through the model into the tasks' meters, pooled over all ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.tasks import Task


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for 'bf16' / 'fp16' on `device`, or a null context for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _valid_sizes(batch: Mapping[str, Any], size: tuple[int, int]) -> list[tuple[int, int]]:
    """Each sample's unpadded (H, W): `meta['valid_size']` written by PadTo, else the full size."""
    metas = batch.get("meta") or [{}] * batch["image"].shape[0]
    return [tuple(m.get("valid_size", size)) for m in metas]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    tasks: Mapping[str, Task],
    meter_info: Mapping[str, Any],
    device: torch.device,
    amp: str = "none",
    progress: Any = None,
) -> dict[str, dict[str, float]]:
    """Metrics per task over every batch, all-reduced across processes when distributed.

    `progress`: a `Progress` advanced by one step and the batch's images (all ranks) per batch.
    Padding (bottom/right, recorded in `meta['valid_size']`) is cropped away before scoring.
    """
    was_training = model.training
    model.eval()
    meters = {name: task.new_meter(**meter_info) for name, task in tasks.items()}
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with autocast_context(device, amp):
            outputs = model(images, tasks=list(tasks)).predictions
        sizes = _valid_sizes(batch, tuple(images.shape[-2:]))
        uniform = all(s == tuple(images.shape[-2:]) for s in sizes)
        for name, task in tasks.items():
            pred = task.decode(outputs[name].float())
            target = batch[name].to(device, non_blocking=True)
            if uniform:
                meters[name].update(pred, target)
                continue
            for i, (h, w) in enumerate(sizes):
                meters[name].update(pred[i : i + 1, ..., :h, :w], target[i : i + 1, ..., :h, :w])
        if progress is not None:
            progress.update(1, images=images.shape[0] * dist.world_size())
    for meter in meters.values():
        meter.all_reduce()
    model.train(was_training)
    return {name: meter.compute() for name, meter in meters.items()}


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised 3 x H x W image tensor back to H x W x 3 uint8 RGB."""
    arr = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    arr = arr * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def target_to_numpy(task: Task, target: Tensor) -> np.ndarray:
    """One sample's target tensor in the decoded-map layout (H x W, or H x W x 3 for normals)."""
    arr = target.detach().cpu().numpy()
    if task.is_label_map or arr.shape[0] == 1:
        return arr.reshape(arr.shape[-2:])
    return arr.transpose(1, 2, 0)


@torch.no_grad()
def predict_panels(
    model: nn.Module,
    batch: Mapping[str, Any],
    tasks: Mapping[str, Task],
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    limit: int,
) -> list[dict[str, Any]]:
    """Up to `limit` samples of `batch` as dicts: image (uint8), predictions and targets (numpy), id."""
    was_training = model.training
    model.eval()
    images = batch["image"][:limit].to(device)
    outputs = model(images, tasks=list(tasks)).predictions
    sizes = _valid_sizes(batch, tuple(images.shape[-2:]))
    panels = []
    for i in range(images.shape[0]):
        h, w = sizes[i]
        preds = {n: target_to_numpy(t, t.decode(outputs[n][i : i + 1].float())[0])[:h, :w] for n, t in tasks.items()}
        targets = {n: target_to_numpy(t, batch[n][i])[:h, :w] for n, t in tasks.items()}
        meta = (batch.get("meta") or [{}] * len(images))[i]
        panels.append(
            {"image": denormalize(images[i], mean, std)[:h, :w], "predictions": preds, "targets": targets, "sample_id": str(meta.get("id", i))}
        )
    model.train(was_training)
    return panels
