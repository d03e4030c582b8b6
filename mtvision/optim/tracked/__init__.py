"""Gradient-tracking methods (per-task gradients kept across steps; the calibrator's params level):
DB-MTL, MoCo and ExcessMTL.  `make_tracker(name, **options)` builds one from `TRACKED`."""

from __future__ import annotations

from typing import Any

from mtvision.errors import unknown_name
from mtvision.optim.tracked.base import GradientTracker
from mtvision.optim.tracked.db_mtl import DBMTL
from mtvision.optim.tracked.excess_mtl import ExcessMTL
from mtvision.optim.tracked.moco import MoCo

TRACKED: dict[str, type[GradientTracker]] = {cls.name: cls for cls in (DBMTL, MoCo, ExcessMTL)}


def make_tracker(name: str, **options: Any) -> GradientTracker:
    """The gradient-tracking method registered as `name`, built with `options`."""
    if name not in TRACKED:
        raise unknown_name("gradient-tracking method", name, TRACKED)
    return TRACKED[name](**options)


__all__ = ["DBMTL", "ExcessMTL", "GradientTracker", "MoCo", "TRACKED", "make_tracker"]
