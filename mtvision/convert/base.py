"""Released checkpoints of the field's models into mtvision pretrained folders.

A format is a function `convert(state, dataset, input_size, backbone) -> Conversion` from the
release's state dict (read by `read_release_checkpoint`) to the config of the equivalent mtvision
model and that model's state dict.  `convert_checkpoint` builds the model, checks that the mapping
covers every key on both sides (listing what is missing or left over), loads it strictly and
writes the pretrained folder that `mtvision.load` and `mtv-eval` open.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mtvision.errors import CheckpointError, MTVisionError
from mtvision.models.config import ModelConfig
from mtvision.models.registry import build_model

DATASETS = ("nyud", "pascal")

RELEASE_TASK_NAMES = {"sal": "saliency", "human_parts": "parts"}
"""Task names of the InvPT / TaskPrompter / MTMamba / MTI-Net releases -> mtvision's."""


class ConversionError(MTVisionError, ValueError):
    """A checkpoint that does not fit the format, dataset or any known backbone size."""


@dataclass
class Conversion:
    """The mtvision model a release checkpoint becomes: its config, its state dict, and the release
    keys skipped on purpose (parameters the release builds but never uses), with the reason."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)


Converter = Callable[[Mapping[str, Tensor], str, "tuple[int, int] | None", "str | None"], Conversion]


def read_release_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a released `.pth` / `.pth.tar`: read with `torch.load(weights_only=True)`;
    a plain state dict or one under `model` / `state_dict`, with or without a `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} needs arbitrary unpickling, which mtvision never does ({exc}). If you trust the file, "
            "re-save its tensors once: python -c \"import torch; c = torch.load('IN', weights_only=False); "
            "torch.save(c.get('model', c.get('state_dict', c)), 'OUT.pth')\" and convert OUT.pth"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {exc}") from None
    state = raw
    if isinstance(raw, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), Mapping):
                state = raw[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (top-level keys: {list(raw)[:8] if isinstance(raw, Mapping) else type(raw).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def check_dataset(dataset: str) -> str:
    """`dataset` if it is one the releases were trained on."""
    if dataset not in DATASETS:
        raise ConversionError(f"unknown dataset {dataset!r} (valid: {', '.join(DATASETS)})")
    return dataset


def load_into_model(conversion: Conversion) -> torch.nn.Module:
    """The mtvision model of `conversion`, built and loaded strictly; ConversionError lists the keys
    the mapping missed or produced in excess, and the shapes that do not fit."""
    model = build_model(conversion.config)
    own = model.state_dict()
    missing = [k for k in own if k not in conversion.state_dict]
    extra = [k for k in conversion.state_dict if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} for {tuple(own[k].shape)}" for k, v in conversion.state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys have no release tensor, e.g. {missing[:6]}")
        if extra:
            parts.append(f"{len(extra)} mapped keys are not in the model, e.g. {extra[:6]}")
        if shapes:
            parts.append(f"{len(shapes)} shapes do not fit, e.g. {shapes[:4]}")
        raise ConversionError("the converted state dict does not fit the model: " + "; ".join(parts))
    model.load_state_dict(conversion.state_dict, strict=True)
    return model.eval()


def take(state: Mapping[str, Tensor], used: set[str], key: str) -> Tensor:
    """`state[key]`, recorded in `used`; ConversionError naming the key when it is absent."""
    if key not in state:
        raise ConversionError(f"the checkpoint has no {key!r}: is it a checkpoint of this model?")
    used.add(key)
    return state[key]


def check_all_used(state: Mapping[str, Tensor], used: set[str], skipped: Mapping[str, str]) -> None:
    """ConversionError listing release keys neither mapped nor skipped on purpose."""
    leftover = [k for k in state if k not in used and k not in skipped]
    if leftover:
        raise ConversionError(f"{len(leftover)} checkpoint keys were not mapped, e.g. {leftover[:8]}: "
                              "a checkpoint of another model, dataset or size?")
