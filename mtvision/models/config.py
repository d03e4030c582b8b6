"""The model config: backbone, decoder, tasks and input preprocessing, as plain dataclasses.

`ModelConfig.from_dict` is strict: an unknown key is an error naming the closest valid key
(with its dotted path).  `to_dict`/`from_dict` round-trip through JSON; `from_yaml` reads YAML
with `yaml.safe_load`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtvision.config_io import ConfigError, from_dict
from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD
from mtvision.errors import closest
from mtvision.models.regularizer3d.config import Regularizer3DConfig

RESIZE_MODES = ("pad", "letterbox", "stretch")


@dataclass
class BackboneConfig:
    """The timm backbone (see `mtvision.models.backbones.create_backbone`).

    name: timm architecture; out_indices: timm feature indices (None: timm's levels of stride >= 4);
    weights: local weights file; pretrained: true: pretrained weights (`weights`, else timm's tag through
    the hub cache), false: random initialisation, null: `weights` when given, else random; kwargs: further timm arguments;
    output_norm: "none", "last" (a LayerNorm on the last level: a ViT's final norm) or "all" (one on
    every level, as mmseg's Swin); output_norm_eps: their epsilon; swin_impl: "timm" or "mmseg"
    (a timm Swin with mmseg's window padding, shift mask and no window shrinking, as MTMamba's).
    upsample_mode: None or the mode of every nn.Upsample of the model ("bilinear": the release
    HRNet's fuse layers, timm's being "nearest"); bn_momentum: None or every BatchNorm's momentum.
    """

    name: str = "resnet18"
    out_indices: list[int] | None = None
    weights: str | None = None
    pretrained: bool | None = None
    drop_path_rate: float | None = None
    channels_last: bool = False
    grad_checkpointing: bool = False
    output_norm: str = "none"
    output_norm_eps: float = 1e-6
    swin_impl: str = "timm"
    upsample_mode: str | None = None
    bn_momentum: float | None = None
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
    regularizer3d: None, or the options of the training-time 3D-aware regulariser
    (`mtvision/models/regularizer3d/model.py`; `{}` for its defaults).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: str = "hps"
    decoder_options: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, int | None] = field(default_factory=dict)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    regularizer3d: Regularizer3DConfig | None = None

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
        if self.regularizer3d is not None:
            self.regularizer3d.validate()

    def resolved(
        self, tasks: Sequence[str], num_classes: Mapping[str, int], input_size: Sequence[int]
    ) -> ModelConfig:
        """A copy for a run on `tasks`: `tasks` filled with the dataset's class counts when the section
        names none, and `preprocess.input_size` set to the training size when it is not given."""
        out = copy.deepcopy(self)
        if not out.tasks:
            out.tasks = {t: num_classes.get(t) for t in tasks}
        if out.preprocess.input_size is None:
            out.preprocess.input_size = [int(v) for v in input_size]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Strictly parse a dict (unknown keys are errors naming the closest valid key)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        return from_dict(cls, data)

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
