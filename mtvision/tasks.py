"""The task registry: one `Task` record per dense-prediction task.

Everything task-specific (head channels, loss, decoding, colours, what counts as ignored, how a
target behaves under flips, scaling and padding, which metric judges it) lives in its record, so
the rest of the code looks behaviour up here instead of branching on task names.  Adding a task
means adding one record to `TASKS`.

Target layouts in a batch:
    semseg, parts: int64 N x H x W, 255 = ignore
    depth:         float32 N x 1 x H x W metres, 0 = invalid
    normals:       float32 N x 3 x H x W unit vectors, zero vector = invalid
    edge:          float32 N x 1 x H x W in {0, 1}, 255 = ignore
    saliency:      float32 N x 1 x H x W in {0, 1}
    texture:       int64 N x H x W in {0, 1} (synthetic only), 255 = ignore
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtvision import visualize
from mtvision.errors import unknown_name

IGNORE_INDEX = 255
EDGE_POS_WEIGHT = 0.95


# ---------------------------------------------------------------- losses
# Each loss is a mean over a task's valid pixels: a per-pixel loss map and a validity mask.  A step
# over several micro-batches or ranks can then divide the summed loss by the valid-pixel count of the
# whole step (`MultiTaskObjective`), so that the loss does not depend on how the batch was split.
# Nothing here reads a value back from the device.


def masked_mean(pixel_loss: Tensor, valid: Tensor) -> Tensor:
    """Mean of `pixel_loss` over `valid`, and 0 (with a gradient path) when nothing is valid."""
    total = torch.where(valid, pixel_loss, torch.zeros_like(pixel_loss)).sum()
    return total / valid.sum().clamp_min(1).to(total.dtype)


def label_valid(target: Tensor) -> Tensor:
    """Pixels of a label map (or an edge map) whose value is not 255."""
    return target != IGNORE_INDEX


def depth_valid(target: Tensor) -> Tensor:
    """Pixels with a depth (target > 0)."""
    return target > 0


def normals_valid(target: Tensor) -> Tensor:
    """Pixels whose normal is not the zero vector (N x H x W)."""
    return target.abs().sum(dim=1) > 0


def all_valid(target: Tensor) -> Tensor:
    """Every pixel."""
    return torch.ones_like(target, dtype=torch.bool)


def segmentation_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel cross-entropy over classes (0 where the label is 255)."""
    return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX, reduction="none")


def depth_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel L1."""
    return (pred - target).abs()


def normals_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel 1 - cos(angle) between the L2-normalised prediction and gt (N x H x W)."""
    return 1.0 - (F.normalize(pred, dim=1) * target).sum(dim=1)


def normals_l1_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel L1 distance between the L2-normalised prediction and gt, summed over the three
    components (N x H x W): the InvPT / TaskPrompter / MTMamba releases' normals loss (ATRC's
    `L1Loss(normalize=True)`), whose mean runs over valid pixels."""
    return (F.normalize(pred, dim=1) - target).abs().sum(dim=1)


def normals_l1_mean_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """`normals_l1_pixels` / 3: the mean over valid *components* of the PAD-Net / MTI-Net / M3ViT
    releases' `NormalsLoss(normalize=True, norm=1)` (and DSMTL's PASCAL code)."""
    return normals_l1_pixels(pred, target) / 3.0


def balanced_edge_pixels(pred: Tensor, target: Tensor, pos_weight: float = EDGE_POS_WEIGHT) -> Tensor:
    """Per-pixel balanced BCE on logits: w on positives, 1 - w on negatives (w = 0.95)."""
    y = torch.where(target != IGNORE_INDEX, target, torch.zeros_like(target))
    weight = torch.where(y > 0.5, torch.full_like(y, pos_weight), torch.full_like(y, 1.0 - pos_weight))
    return F.binary_cross_entropy_with_logits(pred, y, weight=weight, reduction="none")


def saliency_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel loss of saliency logits: binary cross-entropy on one logit; on two (background,
    salient: the InvPT / TaskPrompter releases' layout) the releases' class-balanced 2-class
    cross-entropy, salient pixels weighted by the batch's share of background pixels and background
    pixels by the share of salient ones."""
    if pred.shape[1] != 2:
        return F.binary_cross_entropy_with_logits(pred, target.float(), reduction="none")
    salient = target.float() > 0.5
    w_salient = (~salient).sum() / salient.numel()
    weight = torch.where(salient, w_salient, 1.0 - w_salient)
    return weight * F.cross_entropy(pred, salient[:, 0].long(), reduction="none")[:, None]


def saliency_balanced_pixels(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel class-balanced saliency loss on one logit or two: salient pixels weighted by the
    batch's share of background pixels, background pixels by the share of salient ones.  On one
    logit it is the PAD-Net / MTI-Net / M3ViT releases' `BalancedCrossEntropyLoss`, and, on the
    logit l1 - l0 of a two-logit head, the InvPT-family releases' balanced 2-class cross-entropy."""
    if pred.shape[1] == 2:
        return saliency_pixels(pred, target)
    salient = target.float() > 0.5
    w_salient = (~salient).sum() / salient.numel()
    weight = torch.where(salient, w_salient, 1.0 - w_salient)
    return weight * F.binary_cross_entropy_with_logits(pred, salient.to(pred.dtype), reduction="none")


def segmentation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over classes, ignoring label 255."""
    return masked_mean(segmentation_pixels(pred, target), label_valid(target))


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over pixels with valid depth (target > 0)."""
    return masked_mean(depth_pixels(pred, target), depth_valid(target))


def normals_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of 1 - cos(angle) between L2-normalised prediction and gt, over pixels with non-zero gt."""
    return masked_mean(normals_pixels(pred, target), normals_valid(target))


def balanced_edge_loss(pred: Tensor, target: Tensor, pos_weight: float = EDGE_POS_WEIGHT) -> Tensor:
    """Balanced BCE on logits: w * positives + (1 - w) * negatives, w = 0.95, mean over non-ignored pixels."""
    return masked_mean(balanced_edge_pixels(pred, target, pos_weight), label_valid(target))


def saliency_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits."""
    return masked_mean(saliency_pixels(pred, target), all_valid(target))


# ---------------------------------------------------------------- decoding
def argmax_decode(raw: Tensor) -> Tensor:
    """Logits N x C x H x W -> class map N x H x W (int64)."""
    return raw.argmax(dim=1)


def depth_decode(raw: Tensor) -> Tensor:
    """Raw depth -> metres, clamped to be non-negative."""
    return raw.clamp_min(0.0)


def normals_decode(raw: Tensor) -> Tensor:
    """Unnormalised normals -> unit vectors."""
    return F.normalize(raw, dim=1)


def sigmoid_decode(raw: Tensor) -> Tensor:
    """Logits -> probabilities."""
    return torch.sigmoid(raw)


def saliency_decode(raw: Tensor) -> Tensor:
    """Saliency logits -> N x 1 x H x W probabilities: sigmoid of one logit, softmax of two (channel 1)."""
    return raw.softmax(dim=1)[:, 1:] if raw.shape[1] == 2 else torch.sigmoid(raw)


# ---------------------------------------------------------------- target geometry (numpy, H x W [x C])
def negate_normals_x(normals: np.ndarray) -> np.ndarray:
    """After a horizontal flip of an H x W x 3 normals map, the x component changes sign."""
    out = normals.copy()
    out[..., 0] = -out[..., 0]
    return out


def divide_depth_by_scale(depth: np.ndarray, scale: float) -> np.ndarray:
    """Zooming an image in by `scale` brings the scene closer by the same factor: depth / scale."""
    return depth / np.float32(scale)


# ---------------------------------------------------------------- meters (lazy: metrics imports torch only)
def _segmentation_meter(task: Task, **_: Any):
    from mtvision.metrics import SegmentationMeter

    return SegmentationMeter(task.out_channels, ignore_index=IGNORE_INDEX)


def _depth_meter(task: Task, **_: Any):
    from mtvision.metrics import DepthMeter

    return DepthMeter()


def _normals_meter(task: Task, **_: Any):
    from mtvision.metrics import NormalsMeter

    return NormalsMeter()


def _boundary_meter(task: Task, boundary_tolerance: float = 0.011, **_: Any):
    from mtvision.metrics import BoundaryMeter

    return BoundaryMeter(tolerance=boundary_tolerance, ignore_index=IGNORE_INDEX)


def _saliency_meter(task: Task, **_: Any):
    from mtvision.metrics import SaliencyMeter

    return SaliencyMeter()


@dataclass(frozen=True)
class Task:
    """Everything the code needs to know about one task.

    Attributes:
        name: registry key, also the key in samples, batches and model outputs.
        out_channels: channels of the head's raw output (classes for label tasks).
        pixel_loss: (raw output, target batch) -> per-pixel loss map.
        valid: target batch -> mask of the pixels the loss averages over (`loss`: that mean).
        decode: raw output -> prediction (class map, metres, unit normals, probabilities).
        colorize: one decoded prediction or target (numpy) -> H x W x 3 uint8.
        new_meter_fn: (task, **dataset_info) -> streaming meter for this task.
        primary_metric: the metric Δm% uses for this task.
        is_label_map: integer label map (nearest resizing; int64 in batches; no channel axis).
        target_channels: channels of the target (0 for label maps without channel axis).
        pad_value: fill for padding and for regions outside the image after scaling.
        flip_fn: fix-up applied to the H x W [x C] target after a horizontal flip, or None.
        scale_fn: fix-up (target, zoom factor) applied after geometric scaling, or None.
    """

    name: str
    out_channels: int
    pixel_loss: Callable[[Tensor, Tensor], Tensor]
    valid: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    colorize: Callable[[np.ndarray], np.ndarray]
    new_meter_fn: Callable[..., Any]
    primary_metric: str
    is_label_map: bool
    target_channels: int
    pad_value: float
    flip_fn: Callable[[np.ndarray], np.ndarray] | None = None
    scale_fn: Callable[[np.ndarray, float], np.ndarray] | None = None

    def loss(self, pred: Tensor, target: Tensor, count: Tensor | None = None) -> Tensor:
        """The loss summed over the valid pixels of `target`, divided by their number, or by `count`
        when given (the valid-pixel count of a whole step, see `valid_count`)."""
        valid = self.valid(target)
        total = torch.where(valid, self.pixel_loss(pred, target), torch.zeros((), device=pred.device, dtype=pred.dtype)).sum()
        return total / (valid.sum() if count is None else count).clamp_min(1).to(total.dtype)

    def valid_count(self, target: Tensor) -> Tensor:
        """The number of pixels of `target` the loss averages over (a device tensor)."""
        return self.valid(target).sum()

    def new_meter(self, **dataset_info: Any):
        """A fresh streaming meter (dataset_info: e.g. boundary_tolerance=0.011)."""
        return self.new_meter_fn(self, **dataset_info)

    def with_classes(self, num_classes: int) -> Task:
        """The same task with `num_classes` output channels (label tasks only)."""
        if not self.is_label_map:
            raise ValueError(f"task {self.name!r} has a fixed number of channels ({self.out_channels})")
        if num_classes < 2 or num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes for {self.name!r} must be in [2, 255], got {num_classes}")
        return dataclasses.replace(self, out_channels=num_classes)


def _class_map_task(name: str, num_classes: int) -> Task:
    """A per-pixel classification task (semseg, parts, texture): CE, argmax, mIoU, 255 = ignore."""
    return Task(
        name=name,
        out_channels=num_classes,
        pixel_loss=segmentation_pixels,
        valid=label_valid,
        decode=argmax_decode,
        colorize=visualize.colorize_labels,
        new_meter_fn=_segmentation_meter,
        primary_metric="mIoU",
        is_label_map=True,
        target_channels=0,
        pad_value=IGNORE_INDEX,
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _class_map_task("semseg", 40),
        Task(
            name="depth",
            out_channels=1,
            pixel_loss=depth_pixels,
            valid=depth_valid,
            decode=depth_decode,
            colorize=visualize.colorize_depth,
            new_meter_fn=_depth_meter,
            primary_metric="rmse",
            is_label_map=False,
            target_channels=1,
            pad_value=0.0,
            scale_fn=divide_depth_by_scale,
        ),
        Task(
            name="normals",
            out_channels=3,
            pixel_loss=normals_pixels,
            valid=normals_valid,
            decode=normals_decode,
            colorize=visualize.colorize_normals,
            new_meter_fn=_normals_meter,
            primary_metric="mean",
            is_label_map=False,
            target_channels=3,
            pad_value=0.0,
            flip_fn=negate_normals_x,
        ),
        Task(
            name="edge",
            out_channels=1,
            pixel_loss=balanced_edge_pixels,
            valid=label_valid,
            decode=sigmoid_decode,
            colorize=visualize.colorize_probability,
            new_meter_fn=_boundary_meter,
            primary_metric="odsF",
            is_label_map=False,
            target_channels=1,
            pad_value=IGNORE_INDEX,
        ),
        _class_map_task("parts", 7),
        Task(
            name="saliency",
            out_channels=1,
            pixel_loss=saliency_pixels,
            valid=all_valid,
            decode=saliency_decode,
            colorize=visualize.colorize_probability,
            new_meter_fn=_saliency_meter,
            primary_metric="maxF",
            is_label_map=False,
            target_channels=1,
            pad_value=0.0,
        ),
        _class_map_task("texture", 2),  # the synthetic accent-colour mask: a deliberately unrelated task
    )
}


def get_task(name: str, num_classes: int | None = None) -> Task:
    """The registered task `name`, optionally with `num_classes` output channels (label tasks)."""
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    task = TASKS[name]
    return task.with_classes(num_classes) if num_classes is not None else task


def resolve_tasks(names: list[str] | tuple[str, ...], num_classes: Mapping[str, int] | None = None) -> dict[str, Task]:
    """Task records for `names` (in order), with class counts from `num_classes` where given."""
    num_classes = num_classes or {}
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {list(names)}")
    return {n: get_task(n, num_classes.get(n)) for n in names}


LOSS_VARIANTS: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "normals": {"cosine": normals_pixels, "l1": normals_l1_pixels, "l1_mean": normals_l1_mean_pixels},
    "saliency": {"standard": saliency_pixels, "balanced": saliency_balanced_pixels},
}
"""Per task, the per-pixel losses `optim.task_losses` can choose (the first: the task's default)."""


def with_loss(task: Task, variant: str) -> Task:
    """`task` with its per-pixel loss replaced by the named variant of `LOSS_VARIANTS`."""
    variants = LOSS_VARIANTS.get(task.name, {})
    if variant not in variants:
        if not variants:
            raise ValueError(f"task {task.name!r} has no loss variants (tasks with variants: {', '.join(LOSS_VARIANTS)})")
        raise unknown_name(f"loss variant of task {task.name!r}", variant, variants)
    return dataclasses.replace(task, pixel_loss=variants[variant])


def list_tasks() -> list[str]:
    """Names of all registered tasks."""
    return list(TASKS)
