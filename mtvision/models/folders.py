"""Reading pretrained folders without building a model: `config.json` (`read_config`), the safetensors
weights (`read_weights`) and where a folder is (`resolve_folder`: a local folder or the hub-cache
snapshot of `hf-hub:org/name[@revision]`).  Building the model from them is `load_model` in
`mtvision/models/pretrained.py`; this module imports neither the registry nor any decoder, so a
decoder may read another model's folder (DSMTL's private init).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from mtvision import __version__
from mtvision.errors import CheckpointError
from mtvision.models.config import ConfigError, ModelConfig
from mtvision.models.saving import CONFIG_NAME, FOLDER_FILES, FORMAT_VERSION, WEIGHTS_NAME

_VERSION_KEYS = ("format_version", "mtvision_version")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_folder_config(data: Any, source: str = CONFIG_NAME) -> ModelConfig:
    """Check versions and keys of a config.json dict and return its `ModelConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    if "format_version" not in data:
        raise ConfigError(f"{source}: no 'format_version' key; not an mtvision pretrained folder config")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{source}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        written = data.get("mtvision_version", "a newer version")
        raise ConfigError(
            f"{source} has format_version {version} (written by mtvision {written}); this mtvision "
            f"{__version__} reads format_version {FORMAT_VERSION} at most: upgrade mtvision"
        )
    body = {k: v for k, v in data.items() if k not in _VERSION_KEYS}
    try:
        return ModelConfig.from_dict(body)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a pretrained folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return parse_folder_config(data, str(path))


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never unpickles; corrupt files raise CheckpointError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # pickle protocol marker, or a zip from torch.save
            raise CheckpointError(
                f"{path} is a pickle/zip torch file, not safetensors; it will not be unpickled"
            ) from exc
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc


HUB_PREFIXES = ("hf-hub:", "hf_hub:")
"""A name starting with one of these is a Hugging Face hub repo (`hf-hub:org/name[@revision]`)."""


def hub_snapshot(repo: str) -> Path:
    """The local snapshot folder of hub repo `org/name[@revision]`, through the hub cache.

    `huggingface_hub.snapshot_download` fetches config.json, model.safetensors and README.md into the
    cache (HF_HUB_CACHE) unless they are there; the user's HF_HUB_OFFLINE is respected, and offline with
    nothing cached is one ConfigError saying what to do.
    """
    repo_id, _, revision = repo.partition("@")
    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"{repo!r} is not a hub repo id (expected org/name, optionally @revision)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    except ImportError:
        raise ConfigError(
            f"{repo!r} is not a local folder, and loading from the hub needs huggingface_hub (not installed)"
        ) from None
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=[*FOLDER_FILES])
    except (OSError, EntryNotFoundError, HfHubHTTPError) as exc:
        if constants.HF_HUB_OFFLINE:
            why = "the hub is offline (HF_HUB_OFFLINE is set) and the model is not in the hub cache"
        else:
            why = f"it is not in the hub cache and could not be downloaded ({type(exc).__name__}: {str(exc)[:200]})"
        raise ConfigError(
            f"cannot load hub model {repo!r}: {why} {constants.HF_HUB_CACHE!r}. Run once with the network on and "
            "HF_HUB_OFFLINE unset to fill the cache, point HF_HUB_CACHE at a cache that holds it, or give the "
            f"path of a local pretrained folder ({CONFIG_NAME} + {WEIGHTS_NAME})"
        ) from None
    return Path(folder)


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local pretrained folder; or the hub-cache snapshot of `hf-hub:org/name[@revision]` (also of a
    plain `org/name` that is no local path), see `hub_snapshot`."""
    text = str(name_or_path)
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            return hub_snapshot(text[len(prefix) :])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if _REPO_ID.match(text.partition("@")[0]) and not path.exists():
        return hub_snapshot(text)
    raise ConfigError(f"{text!r} is not a pretrained folder (expected a directory with {CONFIG_NAME})")
