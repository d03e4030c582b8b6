"""Calibrators by name: the plain gradient calibrator, or the sharpness-aware step around it."""

from __future__ import annotations

from typing import Any

from torch import nn

from mtvision.optim.calibrator import GradientCalibrator, make_calibration_method
from mtvision.optim.sam import SharpnessAwareCalibrator

Calibrator = GradientCalibrator | SharpnessAwareCalibrator


def make_calibrator(
    model: nn.Module, method: str, level: str = "features", sam_rho: float | None = None, **options: Any
) -> Calibrator:
    """The calibrator for aggregator `method` (a key of AGGREGATORS, or "graddrop") at `level`;
    with `sam_rho`, the sharpness-aware multi-task step (`mtvision.optim.sam`, params level) instead."""
    aggregator = make_calibration_method(method, level, sam_rho, **options)
    if sam_rho is not None:
        return SharpnessAwareCalibrator(model, aggregator, sam_rho)
    return GradientCalibrator(model, aggregator, level)
