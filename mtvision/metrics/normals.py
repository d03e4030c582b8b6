"""Surface normals: angular error statistics pooled over all valid pixels of the dataset."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial, ratio

BIN_DEG = 0.01
NUM_BINS = 18000  # 180 / BIN_DEG
THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def angular_error_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angle in degrees between the L2-normalised N x 3 x H x W maps (N x H x W, float64).

    Uses 2·atan2(|p − g|, |p + g|), accurate at every angle; a zero prediction scores 90°.
    """
    p = F.normalize(pred.double(), dim=1)
    g = F.normalize(target.double(), dim=1)
    return torch.rad2deg(2.0 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))


class NormalsMeter(Meter):
    """'mean', 'median', 'rmse' (degrees) and '11.25', '22.5', '30' (% of pixels with a smaller error).

    Valid pixels are those whose gt is not the zero vector.  Mean, RMSE and the threshold shares are
    exact (sums and counts).  The median comes from a 0.01° histogram over [0°, 180°] so that it can
    be merged across batches and ranks: it is exact to within half a bin (0.005°).
    """

    higher_is_better = {"mean": False, "median": False, "rmse": False, "11.25": True, "22.5": True, "30": True}

    # state: [valid pixels, sum angle, sum angle^2, count < 11.25, count < 22.5, count < 30, histogram...]
    def state_size(self) -> int:
        return 3 + len(THRESHOLDS_DEG) + NUM_BINS

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: unit normals N x 3 x H x W; target: N x 3 x H x W, zero vector = invalid."""
        check_same_spatial(pred, target, "NormalsMeter")
        if pred.shape[1] != 3 or target.shape[1] != 3:
            raise ValueError(f"NormalsMeter: expects 3 channels, got {tuple(pred.shape)} and {tuple(target.shape)}")
        pred = pred.to(target.device)
        valid = target.abs().sum(dim=1) > 0
        ang = angular_error_deg(pred, target)[valid]
        bins = (ang / BIN_DEG).floor().long().clamp_(0, NUM_BINS - 1)
        stats = torch.cat(
            [
                torch.stack(
                    [torch.tensor(float(ang.numel()), dtype=torch.float64, device=ang.device), ang.sum(), (ang * ang).sum()]
                    + [(ang < t).sum().double() for t in THRESHOLDS_DEG]
                ),
                torch.bincount(bins, minlength=NUM_BINS).double(),
            ]
        )
        self._add(stats)

    def median(self) -> float:
        """Median angle (degrees) to within half a histogram bin."""
        hist = self._state[3 + len(THRESHOLDS_DEG) :]
        n = int(hist.sum().item())
        if n == 0:
            return float("nan")
        cum = hist.cumsum(0)
        # 0-based order statistics (n-1)//2 and n//2; their average is the median
        lo = int(torch.searchsorted(cum, torch.tensor(float((n - 1) // 2 + 1), dtype=torch.float64)).item())
        hi = int(torch.searchsorted(cum, torch.tensor(float(n // 2 + 1), dtype=torch.float64)).item())
        return ((lo + 0.5) + (hi + 0.5)) * BIN_DEG / 2.0

    def compute(self) -> dict[str, float]:
        """Angular error statistics; degrees for mean/median/rmse, % for the thresholds."""
        n, s, sq = self._state[:3].tolist()
        counts = self._state[3 : 3 + len(THRESHOLDS_DEG)].tolist()
        out = {
            "mean": ratio(s, n),
            "median": self.median(),
            "rmse": math.sqrt(ratio(sq, n)) if n > 0 else float("nan"),
        }
        for t, c in zip(("11.25", "22.5", "30"), counts):
            out[t] = 100.0 * ratio(c, n)
        return out
