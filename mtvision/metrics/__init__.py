"""Streaming, all-reduce-aware task metrics (pooled over the dataset) and Δm%."""

from mtvision.metrics.base import Meter
from mtvision.metrics.boundary import BoundaryMeter
from mtvision.metrics.delta import ReferencesError, delta_m, load_references
from mtvision.metrics.depth import DepthMeter
from mtvision.metrics.normals import NormalsMeter
from mtvision.metrics.saliency import SaliencyMeter
from mtvision.metrics.segmentation import SegmentationMeter

__all__ = [
    "BoundaryMeter",
    "DepthMeter",
    "Meter",
    "NormalsMeter",
    "ReferencesError",
    "SaliencyMeter",
    "SegmentationMeter",
    "delta_m",
    "load_references",
]
