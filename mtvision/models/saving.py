"""Writing pretrained folders (`config.json` + `model.safetensors`) atomically, and uploading them to the hub.

This is the writing side of `mtvision/models/pretrained.py` (which rebuilds models from folders). It
imports neither `mtvision.models.registry` nor `mtvision.models.multitask`, so that `MultiTaskModel` can
use it without an import cycle.

A folder is written into a temporary sibling folder (files fsynced, mode 0666 minus the umask, as for any
new file), then renamed over the destination (`mtvision.atomic.atomic_write_folder`): readers see the old
folder or the new one, never a mix, and a failed save (a full disk included) leaves the old folder as it
was. An existing destination is replaced only when it is empty or holds pretrained-folder files only, so
that saving into a folder with other contents never deletes them.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtvision import __version__
from mtvision.atomic import _write_file, atomic_write_folder
from mtvision.errors import MTVisionError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"  # the model card (optional; push_to_hub always writes one)
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)  # what a pretrained folder holds; only these may be replaced


def folder_config(model: torch.nn.Module) -> dict[str, Any]:
    """The config.json contents for `model`: backbone weights, and the decoder options that only
    initialise (a decoder's `INIT_OPTIONS`, e.g. DSMTL's `private_init`), now live in
    model.safetensors."""
    data = model.config.to_dict()
    data["backbone"]["weights"] = None
    data["backbone"]["pretrained"] = False
    decoder = getattr(model, "decoder", None)
    for key in getattr(type(decoder), "INIT_OPTIONS", ()):
        data["decoder_options"].pop(key, None)
    return {"format_version": FORMAT_VERSION, "mtvision_version": __version__, **data}


def _check_replaceable(directory: Path) -> None:
    if not (directory.exists() or directory.is_symlink()):
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; a pretrained folder cannot be saved there")
    others = sorted(p.name for p in directory.iterdir() if p.name not in FOLDER_FILES)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"{directory} holds files that are not part of a pretrained folder ({shown}); saving replaces the "
            "whole folder, so choose a new or empty folder"
        )


def _earlier_card(directory: Path) -> bytes | None:
    try:
        return (directory / CARD_NAME).read_bytes()
    except OSError:
        return None


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, model_card: str | None = None) -> None:
    """Write `config.json` and `model.safetensors` for `model` as the folder `directory`, atomically,
    plus `README.md` when `model_card` (markdown) is given (without one, a README.md already in the folder stays).

    `directory` is created, or replaced when it is empty or an earlier pretrained folder; a folder with
    other files in it raises FileExistsError (nothing is written).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.is_symlink() and directory.is_dir():
        directory = directory.resolve()  # replace the folder the link points to, keep the link
    _check_replaceable(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "mtvision_format_version": str(FORMAT_VERSION)}
    text = (json.dumps(folder_config(model), indent=2) + "\n").encode("utf-8")

    def fill(folder: Path) -> None:
        _write_file(folder / CONFIG_NAME, lambda fh: fh.write(text))
        card = model_card.encode("utf-8") if model_card is not None else _earlier_card(directory)
        if card is not None:  # a card written earlier stays unless a new one is given
            _write_file(folder / CARD_NAME, lambda fh: fh.write(card))
        weights = folder / WEIGHTS_NAME
        save_file(state, str(weights), metadata=meta)
        # safetensors creates its file with mode 0600; give it the mode config.json got from the umask
        os.chmod(weights, stat.S_IMODE((folder / CONFIG_NAME).stat().st_mode))
        with open(weights, "rb") as fh:
            os.fsync(fh.fileno())

    atomic_write_folder(directory, fill)


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    private: bool = True,
    commit_message: str = "Upload model",
    *,
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    command: str | None = None,
    data: str | None = None,
    license: str = "apache-2.0",
    config: str | os.PathLike | None = None,
) -> str:
    """Upload `model`'s pretrained folder (config.json, model.safetensors and a README.md model card) to
    hub repo `repo_id`, created if needed; returns the repo URL.

    Card contents (`mtvision/models/model_card.py`): the tasks, the architecture, `metrics` (task ->
    metric -> value, or the path of an `mtv-eval` metrics JSON) with the `command` that produced them
    (read from the JSON's "command" when not given), the `data` it was trained on, the `license` and the
    experiment `config` (a YAML file, shown in full).  Loading back: `mtvision.load("hf-hub:<repo_id>")`.
    """
    from mtvision.models.model_card import model_card, read_metrics

    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MTVisionError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    split = None
    if metrics is not None and not isinstance(metrics, Mapping):
        metrics, found_command, split = read_metrics(metrics)
        command = command or found_command
    experiment = Path(config).read_text(encoding="utf-8") if config is not None else None
    card = model_card(
        folder_config(model), repo_id=repo_id, metrics=metrics, command=command, split=split, data=data,
        license=license, experiment_config=experiment, num_parameters=sum(p.numel() for p in model.parameters()),
    )
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_pretrained(model, folder, model_card=card)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(url)
