"""Multi-task optimisation: gradient aggregators (Gramian → task weights) and GradDrop."""

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

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AlignedMTL",
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
]
