"""Gradient aggregators: maps from the Gramian K = G·Gᵀ of T task gradients to T weights w.

The combined update is d = Σ_t w_t g_t.  `make_aggregator(name, **options)` builds one from
`AGGREGATORS`; `graddrop` is the element-wise exception that needs the gradients themselves.
"""

from __future__ import annotations

from typing import Any

from mtvision.errors import unknown_name
from mtvision.optim.aggregators.aligned import AlignedMTL
from mtvision.optim.aggregators.base import Aggregator, EqualWeights, check_gramian, min_norm_weights
from mtvision.optim.aggregators.cagrad import CAGrad
from mtvision.optim.aggregators.fairgrad import FairGrad, fair_weights
from mtvision.optim.aggregators.graddrop import graddrop
from mtvision.optim.aggregators.imtl import IMTLG
from mtvision.optim.aggregators.mgda import MGDA, UPGrad
from mtvision.optim.aggregators.nash import NashMTL, nash_alpha
from mtvision.optim.aggregators.ntkmtl import NTKMTL
from mtvision.optim.aggregators.projection import GradVac, PCGrad
from mtvision.optim.aggregators.sdmgrad import SDMGrad

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (EqualWeights, MGDA, PCGrad, CAGrad, IMTLG, NashMTL, AlignedMTL, UPGrad, GradVac, FairGrad, SDMGrad, NTKMTL)
}


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """The aggregator registered as `name`, built with `options` (its constructor's keywords)."""
    if name not in AGGREGATORS:
        raise unknown_name("aggregator", name, AGGREGATORS)
    return AGGREGATORS[name](**options)


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "EqualWeights",
    "FairGrad",
    "GradVac",
    "IMTLG",
    "MGDA",
    "NTKMTL",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "UPGrad",
    "check_gramian",
    "fair_weights",
    "graddrop",
    "make_aggregator",
    "min_norm_weights",
    "nash_alpha",
]
