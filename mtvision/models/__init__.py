"""Models: timm backbones, heads, multi-task decoders, `MultiTaskModel` and `create_model`."""

from mtvision.models.backbones import Backbone, BackboneError, create_backbone
from mtvision.models.config import BackboneConfig, ConfigError, ModelConfig, PreprocessConfig
from mtvision.models.multitask import MultiTaskModel
from mtvision.models.pretrained import CheckpointError, load_model
from mtvision.models.registry import DECODERS, create_model, get_decoder, list_models, register_decoder

__all__ = [
    "DECODERS",
    "Backbone",
    "BackboneConfig",
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "MultiTaskModel",
    "PreprocessConfig",
    "create_backbone",
    "create_model",
    "get_decoder",
    "list_models",
    "load_model",
    "register_decoder",
]
