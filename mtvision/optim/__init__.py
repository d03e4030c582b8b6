"""Multi-task optimisation: gradient aggregators (Gramian → task weights), GradDrop, gradient-tracking
methods (`mtvision.optim.tracked`), loss weighting (`mtvision.optim.weighting`) and the gradient
calibrator that applies them."""

from mtvision.optim.aggregators import (
    AGGREGATORS,
    IMTLG,
    MGDA,
    NTKMTL,
    Aggregator,
    AlignedMTL,
    CAGrad,
    EqualWeights,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    SDMGrad,
    UPGrad,
    graddrop,
    make_aggregator,
)
from mtvision.optim.calibrator import METHODS, CalibrationError, CalibrationStats, GradientCalibrator
from mtvision.optim.tracked import DBMTL, TRACKED, ExcessMTL, GradientTracker, MoCo, make_tracker
from mtvision.optim.weighting import WEIGHTINGS, LossWeighting, make_weighting

__all__ = [
    "AGGREGATORS",
    "DBMTL",
    "METHODS",
    "NTKMTL",
    "TRACKED",
    "Aggregator",
    "AlignedMTL",
    "CalibrationError",
    "CalibrationStats",
    "GradientCalibrator",
    "LossWeighting",
    "WEIGHTINGS",
    "CAGrad",
    "EqualWeights",
    "ExcessMTL",
    "FairGrad",
    "GradVac",
    "GradientTracker",
    "IMTLG",
    "MGDA",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "UPGrad",
    "graddrop",
    "make_aggregator",
    "make_tracker",
    "make_weighting",
]
