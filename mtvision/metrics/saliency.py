"""Saliency: maxF (β² = 0.3) over 19 thresholds and foreground/background mIoU, pooled over the dataset."""

from __future__ import annotations

import torch
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial, ratio

BETA_SQUARED = 0.3
THRESHOLDS = tuple(k / 20.0 for k in range(1, 20))  # 0.05, 0.10, ..., 0.95
IOU_THRESHOLD_INDEX = THRESHOLDS.index(0.5)
IGNORE_INDEX = 255


class SaliencyMeter(Meter):
    """'maxF' (%) and 'mIoU' (%) for saliency probabilities.

    A pixel is predicted salient at threshold t when its probability is >= t.  For every threshold
    the true positives, predicted positives and gt positives are summed over all pixels of the
    dataset; precision, recall and F_β (β² = 0.3) come from those pooled counts and maxF is the
    largest F over the thresholds 0.05, 0.10, ..., 0.95 (an undefined F counts as 0).  This is what
    the ATRC `MaxF` metric and the InvPT `SaliencyMeter` compute (with β² = 0.3, threshold step 0.05);
    it is not the older ASTMT/MTI-Net variant that averages per-image precision and recall.
    'mIoU' is the mean of the foreground and background IoU at threshold 0.5, from pooled counts
    (as the ATRC `MeanIoU` with two classes); a class with an empty union is left out of the mean.
    Target pixels equal to 255 are ignored.
    """

    higher_is_better = {"maxF": True, "mIoU": True}

    # state: [TP per threshold (19), predicted positives per threshold (19), gt positives, valid pixels]
    def state_size(self) -> int:
        return 2 * len(THRESHOLDS) + 2

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: probabilities N x 1 x H x W; target: N x 1 x H x W in {0, 1} (255 = ignore)."""
        check_same_spatial(pred, target, "SaliencyMeter")
        valid = target != IGNORE_INDEX
        gt = target[valid] > 0.5
        prob = pred.to(target.device).double().expand_as(target)[valid]
        thresholds = torch.tensor(THRESHOLDS, dtype=torch.float64, device=prob.device)
        # number of thresholds each pixel reaches; positive at threshold k  <=>  reached > k
        reached = torch.bucketize(prob, thresholds, right=True)
        k = len(THRESHOLDS)
        hist_all = torch.bincount(reached, minlength=k + 1).double()
        hist_pos = torch.bincount(reached[gt], minlength=k + 1).double()
        pp = hist_all.flip(0).cumsum(0).flip(0)[1:]
        tp = hist_pos.flip(0).cumsum(0).flip(0)[1:]
        extra = torch.tensor([float(gt.sum()), float(gt.numel())], dtype=torch.float64, device=tp.device)
        self._add(torch.cat([tp, pp, extra]))

    def f_measures(self) -> Tensor:
        """F_β at each threshold (fraction, NaN replaced by 0)."""
        k = len(THRESHOLDS)
        tp, pp = self._state[:k], self._state[k : 2 * k]
        ap = self._state[2 * k]
        precision = tp / pp
        recall = tp / ap
        f = (1 + BETA_SQUARED) * precision * recall / (BETA_SQUARED * precision + recall)
        return torch.nan_to_num(f, nan=0.0)

    def compute(self) -> dict[str, float]:
        """{'maxF': max F_β over thresholds, 'mIoU': fg/bg IoU mean at 0.5}, both in %."""
        k = len(THRESHOLDS)
        tp = float(self._state[IOU_THRESHOLD_INDEX])
        pp = float(self._state[k + IOU_THRESHOLD_INDEX])
        ap, n = float(self._state[2 * k]), float(self._state[2 * k + 1])
        tn = n - pp - ap + tp
        ious = [ratio(tp, pp + ap - tp), ratio(tn, n - tp)]
        ious = [v for v in ious if v == v]
        miou = 100.0 * sum(ious) / len(ious) if ious else float("nan")
        maxf = 100.0 * float(self.f_measures().max()) if n > 0 else float("nan")
        return {"maxF": maxf, "mIoU": miou}
