"""Semantic segmentation / human parts: mIoU and pixel accuracy from a pooled confusion matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial, ratio


class SegmentationMeter(Meter):
    """mIoU (%) and pixel accuracy 'pixAcc' (%) from one confusion matrix pooled over the dataset.

    Pixels whose gt equals `ignore_index` are skipped.  The mean IoU runs over the classes with a
    non-empty union (present in the gt or predicted somewhere in the data seen); classes absent from
    both everywhere are left out of the mean.  The ATRC and InvPT evaluation code instead averages
    over all classes with an absent class counted as IoU 0; the two agree whenever every class occurs,
    as on the full NYUD-v2 and PASCAL-Context validation sets.
    """

    higher_is_better = {"mIoU": True, "pixAcc": True}

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        super().__init__()

    def state_size(self) -> int:
        return self.num_classes * self.num_classes

    def config(self) -> tuple:
        return (self.num_classes, self.ignore_index)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: class map N x H x W (int); target: N x H x W (int) with `ignore_index` = ignore."""
        if pred.dim() == 4 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        check_same_spatial(pred, target, "SegmentationMeter")
        target = target.long().reshape(-1)
        pred = pred.long().reshape(-1).to(target.device)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        c = self.num_classes
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(f"SegmentationMeter: target labels must be in [0, {c}) or {self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
            raise ValueError(f"SegmentationMeter: predicted labels must be in [0, {c})")
        self._add(torch.bincount(target * c + pred, minlength=c * c))

    def confusion_matrix(self) -> Tensor:
        """C x C pixel counts: rows are gt classes, columns predicted classes."""
        return self._state.reshape(self.num_classes, self.num_classes).clone()

    def class_iou(self) -> list[float]:
        """Per-class IoU in % (NaN for a class absent from both gt and prediction)."""
        cm = self.confusion_matrix()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return [100.0 * ratio(float(i), float(u)) for i, u in zip(tp, union)]

    def compute(self) -> dict[str, float]:
        """{'mIoU': mean IoU over classes with a non-empty union, 'pixAcc': correct / valid}, in %."""
        cm = self.confusion_matrix()
        present = [v for v in self.class_iou() if v == v]
        miou = sum(present) / len(present) if present else float("nan")
        return {"mIoU": miou, "pixAcc": 100.0 * ratio(float(cm.trace()), float(cm.sum()))}
