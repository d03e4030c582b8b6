"""Depth: RMSE, abs-rel, δ<1.25 and log-RMSE pooled over all valid pixels of the dataset."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial, ratio

_EPS_DEPTH = 1e-9


class DepthMeter(Meter):
    """'rmse', 'abs_rel', 'delta1' (% of pixels with max(p/g, g/p) < 1.25) and 'log_rmse'.

    Only pixels with gt > 0 count, and every such pixel of the dataset weighs the same: RMSE is
    sqrt(sum of squared errors / number of valid pixels) over the whole set, as in the InvPT / ATRC
    code (not a mean of per-image RMSEs).  As there, predictions <= 0 (or non-finite) are replaced
    by 1e-9 before any metric is computed, which keeps the ratio and the logarithm defined.
    """

    higher_is_better = {"rmse": False, "abs_rel": False, "delta1": True, "log_rmse": False}

    # state: [valid pixels, sum sq err, sum |p-g|/g, count delta<1.25, sum (log g - log p)^2]
    def state_size(self) -> int:
        return 5

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: N x 1 x H x W metres; target: N x 1 x H x W metres, 0 = invalid."""
        check_same_spatial(pred, target, "DepthMeter")
        if pred.shape != target.shape:
            raise ValueError(f"DepthMeter: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        g = target.double()
        p = pred.double().to(g.device)
        valid = g > 0
        g, p = g[valid], p[valid]
        p = torch.where(torch.isfinite(p) & (p > 0), p, torch.full_like(p, _EPS_DEPTH))
        err = p - g
        stats = torch.stack(
            [
                torch.tensor(float(g.numel()), dtype=torch.float64, device=g.device),
                (err * err).sum(),
                (err.abs() / g).sum(),
                (torch.maximum(p / g, g / p) < 1.25).sum().double(),
                ((torch.log(g) - torch.log(p)) ** 2).sum(),
            ]
        )
        self._add(stats)

    def compute(self) -> dict[str, float]:
        """RMSE and log-RMSE in the data's units, abs-rel as a fraction, delta1 in %."""
        n, sq, rel, d1, lsq = self._state.tolist()
        return {
            "rmse": math.sqrt(ratio(sq, n)) if n > 0 else float("nan"),
            "abs_rel": ratio(rel, n),
            "delta1": 100.0 * ratio(d1, n),
            "log_rmse": math.sqrt(ratio(lsq, n)) if n > 0 else float("nan"),
        }
