"""Multi-task optimisation: gradient aggregators (Gramian → task weights), GradDrop, loss weighting
(`mtvision.optim.weighting`) and the gradient calibrator that applies an aggregator."""

from mtvision.optim.aggregators import (
    AGGREGATORS,
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    CAGrad,
    EqualWeights,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
    graddrop,
    make_aggregator,
)
from mtvision.optim.calibrator import CalibrationError, CalibrationStats, GradientCalibrator
from mtvision.optim.weighting import WEIGHTINGS, LossWeighting, make_weighting

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AlignedMTL",
    "CalibrationError",
    "CalibrationStats",
    "GradientCalibrator",
    "LossWeighting",
    "WEIGHTINGS",
    "CAGrad",
    "EqualWeights",
    "GradVac",
    "IMTLG",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "graddrop",
    "make_aggregator",
    "make_weighting",
]
