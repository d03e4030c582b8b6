"""Multi-task decoders: one file per family; `base.MultiTaskDecoder` is the contract."""

from mtvision.models.decoders.base import BackboneFactory, MultiTaskDecoder
from mtvision.models.decoders.cross_stitch import CrossStitchDecoder, CrossStitchUnit
from mtvision.models.decoders.hps import HPSDecoder

__all__ = ["BackboneFactory", "CrossStitchDecoder", "CrossStitchUnit", "HPSDecoder", "MultiTaskDecoder"]
