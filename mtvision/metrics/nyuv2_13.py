"""The NYUv2-13 optimiser benchmark's nine metrics, its single-task references and its Δm%.

The benchmark (SegNet-MTAN at 288 x 384, MTAN's preprocessed NYUv2 with 13 classes) scores three
tasks with nine metrics: semseg mIoU and pixel accuracy; depth absolute and relative error;
normals mean and median angle and the share of pixels within 11.25°, 22.5° and 30°.  The meters
here compute them as MTAN's release does:

- segmentation: one confusion matrix over the whole split (pixels labelled 0..C-1; the ignore
  label is left out); mIoU is the mean IoU over all C classes, NaN when a class is absent from
  both the labels and the predictions (the release's 0/0), pixel accuracy = correct / labelled.
- depth: the valid pixels are those whose gt is not 0; absolute error |p - g| and relative error
  |p - g| / g on the raw prediction (no clamping).
- normals: the valid pixels are those whose gt components do not sum to 0 (the release's mask: a
  unit normal whose components cancel, such as (1, -1, 0) / √2, counts as invalid too, unlike
  mtvision's `NormalsMeter`, which masks only the zero vector); the error is
  degrees(acos(clamp(p · g, -1, 1))) with p the L2-normalised prediction and g as stored.

Averaging over the split is either:

- "batch" (default): MTAN's release and the Nash-MTL / FAMO code that most optimiser papers run.
  Depth and normals metrics are computed on each evaluation batch and averaged over batches with
  equal weight; the median is the mean of the per-batch medians.  The numbers therefore depend
  on the evaluation batch (2 in the benchmark) and on how batches fall.
- "pixel": LibMTL's NYUv2 example: every valid pixel of the split weighs the same.  The median
  comes from a 0.01° histogram, exact to within 0.005°.

Segmentation is pooled over the split in both.  Shares are in % (the papers print fractions).
Δm% uses `SINGLE_TASK_REFERENCES` and all nine metrics with equal weight; `delta_m_nine` returns
mtvision's sign (positive: better than single-task), `delta_m_papers` the tables' sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial, ratio
from mtvision.metrics.delta import delta_m

NUM_CLASSES = 13
AVERAGING = ("batch", "pixel")
THRESHOLDS = (11.25, 22.5, 30.0)
THRESHOLD_NAMES = ("11.25", "22.5", "30")
BIN_DEG = 0.01
NUM_BINS = 18000

METRICS: dict[str, tuple[str, ...]] = {
    "semseg": ("mIoU", "pixAcc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("mean", "median", *THRESHOLD_NAMES),
}
"""The nine metrics of the benchmark, per task."""

HIGHER_IS_BETTER: dict[str, dict[str, bool]] = {
    "semseg": {"mIoU": True, "pixAcc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normals": {"mean": False, "median": False, "11.25": True, "22.5": True, "30": True},
}

SINGLE_TASK_REFERENCES: dict[str, dict[str, float]] = {
    "semseg": {"mIoU": 38.30, "pixAcc": 63.76},
    "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
    "normals": {"mean": 25.01, "median": 19.21, "11.25": 30.14, "22.5": 57.20, "30": 69.15},
}
"""The single-task SegNet results every optimiser paper's Δm% on this benchmark is taken against:
the single-task row of the NYUv2 table of CAGrad (Liu et al., NeurIPS 2021), reused unchanged by
Nash-MTL, FAMO, FairGrad, SDMGrad, DB-MTL, GO4Align and NTKMTL (shares converted to %)."""

LAST_EPOCHS = 10
"""The papers report the test metrics averaged over the last 10 of the 200 epochs."""


def _check_averaging(averaging: str) -> str:
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    return averaging


class BenchmarkSegmentationMeter(Meter):
    """'mIoU' (mean over all classes, NaN when one has an empty union) and 'pixAcc', in %, from one
    confusion matrix over the split; target labels outside 0..C-1 (the ignore label) are left out."""

    higher_is_better = HIGHER_IS_BETTER["semseg"]

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        super().__init__()

    def state_size(self) -> int:
        return self.num_classes**2

    def config(self) -> tuple:
        return (self.num_classes,)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: class map N x H x W; target: N x H x W labels (others than 0..C-1 are ignored)."""
        check_same_spatial(pred, target, "BenchmarkSegmentationMeter")
        c = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        keep = (target >= 0) & (target < c)
        self._add(torch.bincount(c * target[keep] + pred[keep], minlength=c * c))

    def compute(self) -> dict[str, float]:
        cm = self._state.reshape(self.num_classes, self.num_classes)
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = [float(i) / float(u) if u > 0 else float("nan") for i, u in zip(tp.tolist(), union.tolist())]
        return {"mIoU": 100.0 * sum(iou) / len(iou), "pixAcc": 100.0 * ratio(float(tp.sum()), float(cm.sum()))}


class BenchmarkDepthMeter(Meter):
    """'abs_err' and 'rel_err' over pixels with gt != 0, per batch ("batch") or per pixel ("pixel").

    A batch without a valid pixel is skipped (the release would average in a NaN)."""

    higher_is_better = HIGHER_IS_BETTER["depth"]

    # state: [batches, sum of batch abs, sum of batch rel, valid pixels, sum abs, sum rel]
    def __init__(self, averaging: str = "batch") -> None:
        self.averaging = _check_averaging(averaging)
        super().__init__()

    def state_size(self) -> int:
        return 6

    def config(self) -> tuple:
        return (self.averaging,)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: raw depth N x 1 x H x W; target: N x 1 x H x W, 0 = invalid."""
        check_same_spatial(pred, target, "BenchmarkDepthMeter")
        g = target.double()
        p = pred.double().to(g.device).expand_as(g)
        valid = g != 0
        n = int(valid.sum())
        if n == 0:
            return
        err = (p - g)[valid].abs()
        abs_sum, rel_sum = err.sum(), (err / g[valid]).sum()
        one = torch.ones((), dtype=torch.float64, device=g.device)
        self._add(torch.stack([one, abs_sum / n, rel_sum / n, one * n, abs_sum, rel_sum]))

    def compute(self) -> dict[str, float]:
        b, ab, rb, n, a, r = self._state.tolist()
        if self.averaging == "batch":
            return {"abs_err": ratio(ab, b), "rel_err": ratio(rb, b)}
        return {"abs_err": ratio(a, n), "rel_err": ratio(r, n)}


def release_angles(pred: Tensor, target: Tensor) -> Tensor:
    """The release's per-pixel normal error in degrees (float64) over its valid pixels (gt
    components not summing to 0): acos of the clamped dot product of the L2-normalised
    prediction with the gt as stored."""
    p = torch.nn.functional.normalize(pred.double(), dim=1)
    g = target.double().to(p.device)
    valid = g.sum(dim=1) != 0
    return torch.rad2deg(torch.acos((p * g).sum(dim=1)[valid].clamp(-1.0, 1.0)))


class BenchmarkNormalsMeter(Meter):
    """'mean', 'median' (degrees) and '11.25', '22.5', '30' (% of pixels below), per batch or per pixel."""

    higher_is_better = HIGHER_IS_BETTER["normals"]

    # state: [batches, sum of batch mean, sum of batch median, sums of batch shares (3),
    #         valid pixels, sum angle, counts below (3), histogram (NUM_BINS)]
    def __init__(self, averaging: str = "batch") -> None:
        self.averaging = _check_averaging(averaging)
        super().__init__()

    def state_size(self) -> int:
        return 3 + len(THRESHOLDS) + 2 + len(THRESHOLDS) + NUM_BINS

    def config(self) -> tuple:
        return (self.averaging,)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: normals N x 3 x H x W (normalised here); target: N x 3 x H x W as stored."""
        check_same_spatial(pred, target, "BenchmarkNormalsMeter")
        ang = release_angles(pred, target)
        n = ang.numel()
        if n == 0:
            return
        below = torch.stack([(ang < t).sum().double() for t in THRESHOLDS])
        median = float(np.median(ang.cpu().numpy()))
        head = torch.tensor([1.0, float(ang.mean()), median], dtype=torch.float64, device=ang.device)
        bins = (ang / BIN_DEG).floor().long().clamp_(0, NUM_BINS - 1)
        tail = torch.tensor([float(n), float(ang.sum())], dtype=torch.float64, device=ang.device)
        self._add(torch.cat([head, below / n, tail, below, torch.bincount(bins, minlength=NUM_BINS).double()]))

    def _pixel_median(self) -> float:
        hist = self._state[3 + len(THRESHOLDS) + 2 + len(THRESHOLDS) :]
        n = int(hist.sum())
        if n == 0:
            return float("nan")
        cum = hist.cumsum(0)
        lo = int(torch.searchsorted(cum, torch.tensor(float((n - 1) // 2 + 1), dtype=torch.float64)))
        hi = int(torch.searchsorted(cum, torch.tensor(float(n // 2 + 1), dtype=torch.float64)))
        return (lo + hi + 1.0) * BIN_DEG / 2.0

    def compute(self) -> dict[str, float]:
        k = len(THRESHOLDS)
        s = self._state.tolist()
        if self.averaging == "batch":
            b = s[0]
            out = {"mean": ratio(s[1], b), "median": ratio(s[2], b)}
            shares = [100.0 * ratio(v, b) for v in s[3 : 3 + k]]
        else:
            n, total = s[3 + k], s[4 + k]
            out = {"mean": ratio(total, n), "median": self._pixel_median()}
            shares = [100.0 * ratio(v, n) for v in s[5 + k : 5 + 2 * k]]
        out.update(zip(THRESHOLD_NAMES, shares))
        return out


@dataclass(frozen=True)
class Benchmark:
    """A benchmark protocol: the tasks it scores, its meters, its references and how many final
    epochs its reported numbers average over."""

    name: str
    num_classes: int = NUM_CLASSES
    last_epochs: int = LAST_EPOCHS
    averagings: tuple[str, ...] = AVERAGING
    references: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: SINGLE_TASK_REFERENCES)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(METRICS)

    def meters(self, averaging: str = "batch") -> dict[str, Meter]:
        """Fresh meters of the benchmark's three tasks."""
        return {
            "semseg": BenchmarkSegmentationMeter(self.num_classes),
            "depth": BenchmarkDepthMeter(averaging),
            "normals": BenchmarkNormalsMeter(averaging),
        }

    def delta_m(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """Δm% over the nine metrics against `references` (mtvision's sign: positive is better)."""
        return delta_m_nine(metrics, self.references)


NYUV2_13_BENCHMARK = Benchmark("nyuv2_13")
"""The SegNet-MTAN NYUv2-13 optimiser benchmark."""


def delta_m_nine(
    metrics: Mapping[str, Mapping[str, float]], references: Mapping[str, Mapping[str, float]] = SINGLE_TASK_REFERENCES
) -> float:
    """Δm% over the nine metrics (equal weights) against `references`; positive: better than single-task."""
    results = {t: {k: metrics[t][k] for k in names} for t, names in METRICS.items() if t in metrics}
    missing = [t for t in METRICS if t not in results]
    if missing:
        raise ValueError(f"the nine-metric Δm needs results for {missing}")
    return delta_m(results, references, primary=None, higher_is_better=HIGHER_IS_BETTER)


def delta_m_papers(
    metrics: Mapping[str, Mapping[str, float]], references: Mapping[str, Mapping[str, float]] = SINGLE_TASK_REFERENCES
) -> float:
    """The same Δm% with the optimiser papers' sign (lower is better): −`delta_m_nine`."""
    return -delta_m_nine(metrics, references)


def mean_metrics(history: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Metric-wise mean of several evaluations (each task -> metric -> value)."""
    if not history:
        raise ValueError("mean_metrics needs at least one evaluation")
    first = history[0]
    return {
        t: {k: math.fsum(h[t][k] for h in history) / len(history) for k in first[t]} for t in first
    }
