"""Pretrained folders: `config.json` + `model.safetensors`, read without unpickling; `load_model`.

config.json holds `format_version`, `mtvision_version` and the `ModelConfig` fields.  A newer
format_version, an unknown key, a corrupt or truncated weights file, or a file that is not
safetensors (e.g. a pickle) is a clear `ConfigError`/`CheckpointError`.

`load_model` / `mtvision.load` take a local folder or `hf-hub:org/name[@revision]`, resolved through the
Hugging Face hub cache (`hub_snapshot`).

Reading a folder without building its model (`read_config`, `read_weights`, `resolve_folder`,
`hub_snapshot`) lives in `mtvision/models/folders.py` and is re-exported here.  This is the loading side; writing (`save_pretrained`, `folder_config`, `push_to_hub` and the file names)
lives in `mtvision/models/saving.py`, which imports neither the registry nor `MultiTaskModel`, and is
re-exported here.  The import order is one-way: pretrained -> registry -> multitask -> saving.
"""

from __future__ import annotations

import os

import torch

from mtvision.errors import CheckpointError, closest
from mtvision.models.folders import (
    hub_snapshot,
    parse_folder_config,
    read_config,
    read_weights,
    resolve_folder,
)
from mtvision.models.registry import build_model
from mtvision.models.saving import (
    CONFIG_NAME,
    FOLDER_FILES,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    folder_config,
    push_to_hub,
    save_pretrained,
)

__all__ = [
    "CONFIG_NAME",
    "FOLDER_FILES",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CheckpointError",
    "folder_config",
    "load_model",
    "parse_folder_config",
    "push_to_hub",
    "read_config",
    "hub_snapshot",
    "read_weights",
    "resolve_folder",
    "save_pretrained",
]


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Rebuild and load the `MultiTaskModel` of a pretrained folder, in eval mode."""
    folder = resolve_folder(name_or_path)
    config = read_config(folder)
    state = read_weights(folder / WEIGHTS_NAME)
    model = build_model(config)
    _load_shape_check(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        hint = ""
        if unexpected and missing:
            near = closest(unexpected[0], missing)
            hint = f" ({unexpected[0]!r} looks like {near!r})" if near else ""
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} does not fit the model of {CONFIG_NAME}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}{hint}"
        )
    if device is not None:
        model.to(device)
    return model.eval()


def _load_shape_check(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
