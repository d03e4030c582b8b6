"""Decoder registry (a name -> a decoder class or builder function) and `create_model`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from mtvision.errors import closest, unknown_name
from mtvision.models.backbones import create_backbone
from mtvision.models.config import BackboneConfig, ConfigError, ModelConfig
from mtvision.models.decoders import CrossStitchDecoder, HPSDecoder, MultiTaskDecoder
from mtvision.models.decoders.branched import BranchedDecoder
from mtvision.models.decoders.controllable import ControllableDecoder
from mtvision.models.decoders.dsmtl import DSMTLDecoder
from mtvision.models.decoders.invpt import CrossTaskAttentionDecoder
from mtvision.models.decoders.m3vit import M3ViTDecoder
from mtvision.models.decoders.mmoe import MMoEDecoder
from mtvision.models.decoders.mtan import MTANDecoder
from mtvision.models.decoders.mtinet import MTINetDecoder
from mtvision.models.decoders.mtmamba import CrossTaskSSMDecoder
from mtvision.models.decoders.padnet import PADNetDecoder
from mtvision.models.decoders.taps import TAPSDecoder
from mtvision.models.decoders.taskexpert import TaskExpertDecoder
from mtvision.models.decoders.taskprompter import TaskPrompterDecoder
from mtvision.models.multitask import MultiTaskModel
from mtvision.models.regularizer3d.model import ThreeDAwareModel
from mtvision.tasks import resolve_tasks

DecoderBuilder = Callable[..., MultiTaskDecoder]

DECODERS: dict[str, DecoderBuilder] = {
    "hps": HPSDecoder,
    "branched": BranchedDecoder,
    "cross_stitch": CrossStitchDecoder,
    "invpt": CrossTaskAttentionDecoder,
    "taskprompter": TaskPrompterDecoder,
    "padnet": PADNetDecoder,
    "mtinet": MTINetDecoder,
    "mmoe": MMoEDecoder,
    "m3vit": M3ViTDecoder,
    "mtmamba": CrossTaskSSMDecoder,
    "taskexpert": TaskExpertDecoder,
    "taps": TAPSDecoder,
    "mtan": MTANDecoder,
    "controllable": ControllableDecoder,
    "dsmtl": DSMTLDecoder,
}


def register_decoder(name: str, builder: DecoderBuilder) -> None:
    """Make `builder(make_backbone, tasks, **options)` available to configs as `decoder: name`."""
    if name in DECODERS and DECODERS[name] is not builder:
        raise ValueError(f"decoder {name!r} is already registered")
    DECODERS[name] = builder


def get_decoder(name: str) -> DecoderBuilder:
    """The builder registered as `name` (UnknownNameError with a suggestion otherwise)."""
    if name not in DECODERS:
        raise unknown_name("decoder", name, DECODERS)
    return DECODERS[name]


def list_models() -> list[str]:
    """Names of the registered decoders (model families)."""
    return sorted(DECODERS)


def _option_names(builder: DecoderBuilder) -> list[str] | None:
    params = list(inspect.signature(builder).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_model(config: ModelConfig) -> MultiTaskModel:
    """Build the model a validated `ModelConfig` describes."""
    config.validate()
    builder = get_decoder(config.decoder)
    valid = _option_names(builder)
    for key in config.decoder_options if valid is not None else ():
        if key not in valid:
            hint = closest(key, valid)
            extra = f"; did you mean 'decoder_options.{hint}'?" if hint else ""
            raise ConfigError(
                f"unknown option 'decoder_options.{key}' for decoder {config.decoder!r}{extra} (valid: {', '.join(valid)})"
            )
    tasks = resolve_tasks(list(config.tasks), {k: v for k, v in config.tasks.items() if v is not None})
    b = config.backbone
    make_backbone = functools.partial(
        create_backbone,
        b.name,
        out_indices=b.out_indices,
        weights=b.weights,
        pretrained=b.pretrained,
        drop_path_rate=b.drop_path_rate,
        channels_last=b.channels_last,
        grad_checkpointing=b.grad_checkpointing,
        output_norm=b.output_norm,
        output_norm_eps=b.output_norm_eps,
        upsample_mode=b.upsample_mode,
        bn_momentum=b.bn_momentum,
        swin_impl=b.swin_impl,
        **b.kwargs,
    )
    decoder = builder(make_backbone, tasks, **config.decoder_options)
    if config.regularizer3d is not None:  # the training-time 3D-aware regulariser around the model
        return ThreeDAwareModel(config, decoder)
    return MultiTaskModel(config, decoder)


def create_model(
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike | None = None, **kwargs: Any
) -> MultiTaskModel:
    """Build a multi-task model from a config (object, dict or YAML path) and/or keyword overrides.

    Keyword shortcuts: `backbone="resnet18"` sets the backbone name (a dict merges into the backbone
    section), backbone options such as `pretrained=True` or `weights=...` go to the backbone section,
    `tasks=["semseg", "depth"]` uses default class counts.  Example:
    `create_model(backbone="resnet18", decoder="hps", tasks={"semseg": 13, "depth": None})`.
    """
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, ModelConfig):
        data = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        data = ModelConfig.from_yaml(config).to_dict()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ConfigError(f"create_model expects a ModelConfig, a mapping or a YAML path, got {type(config).__name__}")
    backbone_options = {f.name for f in dataclasses.fields(BackboneConfig)} - {"name"}
    for key, value in kwargs.items():
        if key in backbone_options:  # create_model(pretrained=True): a backbone option
            data["backbone"] = {**dict(data.get("backbone") or {}), key: value}
        elif key == "backbone" and isinstance(value, str):
            data["backbone"] = {**dict(data.get("backbone") or {}), "name": value}
        elif key == "backbone" and isinstance(value, Mapping):
            data["backbone"] = {**dict(data.get("backbone") or {}), **value}
        elif key == "tasks" and isinstance(value, (list, tuple)):
            data["tasks"] = {t: None for t in value}
        else:
            data[key] = value
    return build_model(ModelConfig.from_dict(data))
