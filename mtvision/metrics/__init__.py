"""Streaming, all-reduce-aware task metrics (pooled over the dataset) and Δm%."""

from mtvision.metrics.base import Meter
from mtvision.metrics.boundary import BoundaryMeter
from mtvision.metrics.delta import ReferencesError, delta_m, load_references
from mtvision.metrics.depth import DepthMeter
from mtvision.metrics.normals import NormalsMeter
from mtvision.metrics.nyuv2_13 import NYUV2_13_BENCHMARK, Benchmark, delta_m_nine
from mtvision.metrics.saliency import SaliencyMeter
from mtvision.metrics.segmentation import SegmentationMeter

__all__ = [
    "Benchmark",
    "BoundaryMeter",
    "DepthMeter",
    "Meter",
    "NYUV2_13_BENCHMARK",
    "NormalsMeter",
    "ReferencesError",
    "SaliencyMeter",
    "SegmentationMeter",
    "delta_m",
    "delta_m_nine",
    "load_references",
]
