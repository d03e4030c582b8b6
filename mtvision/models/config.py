"""The model config: backbone, decoder, tasks and input preprocessing, as plain dataclasses.

`ModelConfig.from_dict` is strict: an unknown key is an error naming the closest valid key
(with its dotted path).  `to_dict`/`from_dict` round-trip through JSON; `from_yaml` reads YAML
with `yaml.safe_load`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD
from mtvision.errors import MTVisionError, closest

RESIZE_MODES = ("pad", "letterbox", "stretch")


class ConfigError(MTVisionError, ValueError):
    """A model config or config.json that is malformed, unknown or from a newer version."""


@dataclass
class BackboneConfig:
    """The timm backbone (see `mtvision.models.backbones.create_backbone`).

    name: timm architecture; out_indices: timm feature indices (None: timm's levels of stride >= 4);
    weights: local weights file; pretrained: require weights; kwargs: further timm arguments.
    """

    name: str = "resnet18"
    out_indices: list[int] | None = None
    weights: str | None = None
    pretrained: bool = False
    drop_path_rate: float | None = None
    channels_last: bool = False
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreprocessConfig:
    """How the predictor turns an RGB uint8 image into the network input.

    mode: "pad" (keep the size, pad bottom/right to a multiple of size_divisor), "letterbox" (resize
    keeping the aspect ratio to fit input_size, pad the rest) or "stretch" (resize to input_size).
    Pixels are scaled to [0, 1], then normalised with mean/std; padding is 0 after normalisation.
    """

    mode: str = "pad"
    input_size: list[int] | None = None
    size_divisor: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def validate(self) -> None:
        if self.mode not in RESIZE_MODES:
            hint = closest(self.mode, RESIZE_MODES)
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"preprocess.mode {self.mode!r} is not one of {RESIZE_MODES}{extra}")
        if self.mode != "pad" and self.input_size is None:
            raise ConfigError(f"preprocess.mode {self.mode!r} needs preprocess.input_size [H, W]")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise ConfigError(f"preprocess.input_size must be [H, W] with positive sizes, got {self.input_size}")
        if self.size_divisor < 1:
            raise ConfigError(f"preprocess.size_divisor must be >= 1, got {self.size_divisor}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("preprocess.mean and preprocess.std need 3 values each, std > 0")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and preprocess its input.

    tasks: task name -> number of classes (label tasks) or None (the registry default).
    decoder: a name from `mtvision.list_models()`; decoder_options: its keyword options.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: str = "hps"
    decoder_options: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, int | None] = field(default_factory=dict)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def validate(self) -> None:
        """Raise ConfigError (or UnknownNameError for tasks) when the config cannot describe a model."""
        from mtvision.tasks import resolve_tasks

        if not self.tasks:
            raise ConfigError("a model config needs at least one task under 'tasks'")
        try:
            resolve_tasks(list(self.tasks), {k: v for k, v in self.tasks.items() if v is not None})
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.preprocess.validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Strictly parse a dict (unknown keys are errors naming the closest valid key)."""
        config = _build(cls, data, "")
        config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a YAML file holding a model config (yaml.safe_load)."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = closest(str(key), names)
            extra = f"; did you mean {prefix + hint!r}?" if hint else ""
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{extra} (valid: {', '.join(names)})")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint_type, prefix + key)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Light type check of a leaf value against its annotation; tuples become lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(value, opt, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key {where!r} has a value of the wrong type: {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where!r} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {where!r} must be an integer, got {value!r}")
        return value
    if hint in (bool, str) and not isinstance(value, hint):
        raise ConfigError(f"config key {where!r} must be a {hint.__name__}, got {value!r}")
    return value
