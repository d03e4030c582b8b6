"""Atomic training checkpoints: `torch.save` to write, `torch.load(weights_only=True)` to read, never unpickle.

Layout. A checkpoint is a folder holding two files:

- ``state.pt``: the whole training state, written by ``torch.save`` (a zip archive) and read back with
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only and refuses any other
  object, so a malicious pickle is never executed;
- ``state.json``: a small manifest (format name and version, the mtvision and torch versions, and the size
  and SHA-256 of ``state.pt``), written last: a folder with a readable ``state.json`` is complete, and the
  size and checksum catch truncated, damaged or replaced state files before ``torch.load`` sees them.

What may be stored is checked at save time, so that every checkpoint written can be read back under
``weights_only=True`` by any supported torch: tensors (detached; a view smaller than its storage is stored
compactly), None, bools, ints, floats, strings, and lists, tuples and dicts of those (dict keys: None,
bools, numbers, strings or tuples of them). numpy scalars become Python numbers; other mappings become
dicts (OrderedDicts, such as ``state_dict()``, stay OrderedDicts with their ``_metadata``). numpy arrays,
sets, tuple subclasses (namedtuples) and any other object are refused with a CheckpointError naming where
they are, before anything is written.

The folder is built under a temporary name next to its destination (files fsynced), then renamed into place
and the parent folder fsynced (`mtvision.atomic.atomic_write_folder`), so a crash or a full disk leaves the
previous checkpoint untouched.

Old checkpoints. Folders written by earlier development versions (checkpoint format 1: a typed-JSON
``state.json`` plus ``tensors.safetensors``) are refused with a CheckpointError that explains how to go on,
rather than read by a one-time converter: a reader would keep the whole typed-JSON decoder alive for
checkpoints of unreleased versions, while the model a run produced stays usable (its ``model/`` pretrained
folder, config.json + model.safetensors, is unchanged and loads with ``mtvision.load``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mtvision import __version__
from mtvision.atomic import _temp_name, _write_file, atomic_write_bytes, atomic_write_folder
from mtvision.errors import CheckpointError

__all__ = [
    "DATA_FILE",
    "MANIFEST_FILE",
    "CheckpointError",
    "CheckpointManager",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "mtvision-checkpoint"
VERSION = 2
MANIFEST_FILE = "state.json"
DATA_FILE = "state.pt"
LEGACY_TENSORS_FILE = "tensors.safetensors"  # format 1 (refused, see the module docstring)
_CHUNK = 1 << 22

# what torch.load(weights_only=True) rebuilds in every supported torch version (setup.cfg: torch>=2.1)
_ATOMS = (type(None), bool, int, float, str)


# ----------------------------------------------------------------------------------------------------------
# what may be stored


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _storable(value: Any, where: str) -> Any:
    """`value` made of types `torch.load(weights_only=True)` rebuilds; CheckpointError for anything else."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.layout == torch.strided and value.untyped_storage().nbytes() > value.nbytes:
            value = value.clone()  # a view: store its own elements, not the whole storage it looks into
        return value
    if type(value) in _ATOMS:
        return value
    if isinstance(value, np.generic) and type(value.item()) in _ATOMS:
        return value.item()
    if isinstance(value, np.ndarray):
        raise CheckpointError(
            f"cannot store a numpy array at {where or '<root>'!r}: store a tensor (torch.from_numpy) or a list"
        )
    if type(value) is tuple:
        return tuple(_storable(v, _join(where, i)) for i, v in enumerate(value))
    if type(value) is list:
        return [_storable(v, _join(where, i)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[Any, Any] = OrderedDict() if isinstance(value, OrderedDict) else {}
        for k, v in value.items():
            out[_storable_key(k, where)] = _storable(v, _join(where, k))
        metadata = getattr(value, "_metadata", None)
        if isinstance(out, OrderedDict) and metadata is not None:
            out._metadata = _storable(metadata, _join(where, "_metadata"))  # type: ignore[attr-defined]
        return out
    raise CheckpointError(
        f"cannot store a {type(value).__name__} at {where or '<root>'!r}: checkpoints hold tensors, ints, "
        "floats, strings, bools, None, and lists, tuples and dicts of those"
    )


def _storable_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    if type(key) is tuple:
        return tuple(_storable_key(k, where) for k in key)
    if type(key) in _ATOMS:
        return key
    raise CheckpointError(f"cannot store the dict key {key!r} ({type(key).__name__}) at {where or '<root>'!r}")


# ----------------------------------------------------------------------------------------------------------
# save


class _HashingWriter:
    """Forwards writes to a file while counting bytes and computing their SHA-256; keeps the first OSError
    (torch.save reports a failed write as a RuntimeError, which would hide a full disk's ENOSPC)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.size, self.sha = fh, 0, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` as the checkpoint folder `path` (replacing an existing one atomically); returns `path`.

    `state` usually holds model/optimizer/scheduler/scaler/weighting/calibrator state dicts (or None),
    'rng' (see `capture_rng_state`), 'epoch', 'step', 'sampler', 'config', 'metrics' and 'best'.
    What may be stored is listed in the module docstring; anything else raises CheckpointError before
    anything is written.
    """
    plain = _storable(dict(state), "")
    info: dict[str, Any] = {"file": DATA_FILE}

    def write_state(fh: BinaryIO) -> None:
        out = _HashingWriter(fh)
        try:
            torch.save(plain, out)
        except BaseException:
            if out.error is not None:
                raise out.error from None
            raise
        info.update(bytes=out.size, sha256=out.sha.hexdigest())

    def fill(folder: Path) -> None:
        _write_file(folder / DATA_FILE, write_state)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "mtvision_version": __version__,
            "torch_version": torch.__version__,
            "data": info,
        }
        text = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
        _write_file(folder / MANIFEST_FILE, lambda fh: fh.write(text))

    try:
        return atomic_write_folder(path, fill)
    except OSError as exc:
        if exc.filename is None:  # a write that failed inside torch.save: name the checkpoint
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


# ----------------------------------------------------------------------------------------------------------
# load


def _delete_hint(folder: Path) -> str:
    return (
        f"; if this is the newest checkpoint of a run, delete the folder {folder} and --resume falls back "
        "to the previous checkpoint"
    )


def _old_format_error(folder: Path) -> CheckpointError:
    run = folder.parent.parent if folder.parent.name == "checkpoints" else None
    model = run / "model" if run is not None else None
    if model is not None and (model / "config.json").is_file():
        usable = (
            f"The model of that run is still usable: its pretrained folder loads with mtvision.load({str(model)!r}). "
        )
    else:
        usable = (
            "The pretrained folder a run writes when training ends (<output_dir>/model/: config.json + "
            "model.safetensors) is unchanged and still loads with mtvision.load(). "
        )
    return CheckpointError(
        f"{folder} is a training checkpoint in the pre-0.1 format (checkpoint format 1: {MANIFEST_FILE} + "
        f"{LEGACY_TENSORS_FILE}) written by an older mtvision; this mtvision (checkpoint format {VERSION}: "
        f"{MANIFEST_FILE} + {DATA_FILE}) cannot resume from it. {usable}To go on, start a new run (a new "
        "output_dir, or --overwrite), or finish this run with the older mtvision that wrote it."
    )


def _resolve_folder(path: Path) -> Path:
    if path.is_file():
        if path.name in (MANIFEST_FILE, DATA_FILE, LEGACY_TENSORS_FILE):
            return path.parent
        raise CheckpointError(
            f"{path} is not an mtvision checkpoint: expected a folder with {MANIFEST_FILE} and {DATA_FILE} "
            "(lone .pt/.pth files are not loaded)"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _read_manifest(folder: Path) -> dict[str, Any]:
    manifest_file = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        if (folder / LEGACY_TENSORS_FILE).exists() and not (folder / DATA_FILE).exists():
            raise _old_format_error(folder) from None
        raise CheckpointError(
            f"incomplete checkpoint: {manifest_file} is missing (an interrupted save?){_delete_hint(folder)}"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"corrupt or truncated checkpoint file {manifest_file}: {exc}{_delete_hint(folder)}"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_file} is not an mtvision checkpoint manifest")
    version = manifest.get("version")
    if isinstance(version, bool):
        version = repr(version)
    if version == 1:
        raise _old_format_error(folder)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        written = manifest.get("mtvision_version", "another version")
        raise CheckpointError(
            f"{manifest_file} has checkpoint format version {version!r} (written by mtvision {written}); "
            f"this mtvision reads format {VERSION}: use a matching mtvision"
        )
    info = manifest.get("data")
    if (
        not isinstance(info, dict)
        or info.get("file") != DATA_FILE
        or not isinstance(info.get("bytes"), int)
        or not isinstance(info.get("sha256"), str)
    ):
        raise CheckpointError(f"malformed checkpoint manifest {manifest_file}: no valid 'data' entry")
    return manifest


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _refusal(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported global" in line]
    return (found or lines or [type(exc).__name__])[0]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """The state saved by `save_checkpoint`, with its types (tuples, int keys, tensors) as they were saved.

    `path` is the checkpoint folder (or a file inside it). Tensors are placed on `map_location`.
    `verify` checks the state file's SHA-256 against the manifest. Raises CheckpointError naming the bad
    file (and, for a damaged checkpoint, the folder to delete so that --resume uses the previous one).
    """
    folder = _resolve_folder(Path(path))
    info = _read_manifest(folder)["data"]
    data_file = folder / DATA_FILE
    try:
        size = data_file.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint: {data_file} is missing{_delete_hint(folder)}") from None
    if size != info["bytes"]:
        raise CheckpointError(
            f"truncated or damaged checkpoint file {data_file}: {size} bytes, {folder / MANIFEST_FILE} says "
            f"{info['bytes']}{_delete_hint(folder)}"
        )
    if verify and _file_digest(data_file) != info["sha256"]:
        raise CheckpointError(
            f"damaged or modified checkpoint file {data_file}: SHA-256 does not match {folder / MANIFEST_FILE}"
            f"{_delete_hint(folder)}"
        )
    with open(data_file, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(
            f"{data_file} is not a torch.save archive, so not a checkpoint written by mtvision; it was not "
            f"loaded{_delete_hint(folder)}"
        )
    try:
        state = torch.load(data_file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {data_file}: it holds objects other than tensors and plain Python containers "
            f"(torch.load(weights_only=True) rejected it and ran none of it: {_refusal(exc)})"
        ) from exc
    except Exception as exc:  # torch reports a damaged archive as RuntimeError, EOFError, ValueError...
        raise CheckpointError(f"corrupt checkpoint file {data_file}: {exc}{_delete_hint(folder)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{data_file} does not hold a checkpoint state (a dict), but a {type(state).__name__}")
    return state


# ----------------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's `random`, numpy's global RNG, torch's CPU RNG and the current CUDA device's RNG.

    Python and numpy states are plain ints, floats, strings and lists (JSON-able; no numpy objects), torch
    states are uint8 tensors, so `torch.load(weights_only=True)` reads them back. The CUDA entry is None
    unless CUDA is initialised (one device per process, as under torchrun).
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state(torch.cuda.current_device())
    return {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss": gauss},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": [int(x) for x in np_state["state"]["key"].tolist()],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states returned by `capture_rng_state` (the CUDA one only where CUDA is available)."""
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        np.random.set_state(
            {
                "bit_generator": npy["bit_generator"],
                "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
                "has_gauss": npy["has_gauss"],
                "gauss": npy["gauss"],
            }
        )
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"malformed RNG state: {exc!r}") from exc
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------------------
# rotating checkpoints

_STEP_DIR = re.compile(r"step_(\d+)")
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.(tmp|old|del)")


class CheckpointManager:
    """Checkpoints under `out_dir/checkpoints/step_XXXXXX/`, with `last.json`/`best.json` pointers.

    Pointers are small JSON files replaced atomically (more portable and robust than symlinks). Only the
    newest `keep_last` checkpoints are kept, plus the best and the last one.
    """

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        """The folder of the checkpoint at `step`."""
        return self.root / f"step_{step:06d}"

    def save(self, state: Mapping[str, Any], step: int, is_best: bool = False) -> Path:
        """Save `state` as the checkpoint of `step`, update the pointers, prune old checkpoints; returns its folder."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        path = save_checkpoint(self.path_for(step), state)
        pointer = json.dumps({"path": path.name, "step": step}).encode("utf-8")
        atomic_write_bytes(self.root / "last.json", pointer)
        if is_best:
            atomic_write_bytes(self.root / "best.json", pointer)
        self._prune()
        return path

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders (those with a manifest), oldest step first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
        return [p for _, p in sorted(found) if (p / MANIFEST_FILE).is_file()]

    def latest(self) -> Path | None:
        """The last saved checkpoint (falling back to the newest complete folder when the pointer is
        unreadable or its folder is gone or incomplete), or None."""
        found = self._pointer("last.json")
        if found is not None:
            return found
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def best(self) -> Path | None:
        """The checkpoint last saved with is_best=True, or None."""
        return self._pointer("best.json")

    def _pointer(self, name: str) -> Path | None:
        try:
            data = json.loads((self.root / name).read_text(encoding="utf-8"))
            target = data["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(target, str) or not _STEP_DIR.fullmatch(target):
            return None
        path = self.root / target
        return path if (path / MANIFEST_FILE).is_file() else None

    def _prune(self) -> None:
        complete = self.checkpoints()
        keep = set(complete[-self.keep_last :]) | {p for p in (self.best(), self.latest()) if p is not None}
        for path in complete:
            if path not in keep:
                trash = _temp_name(path, "del")
                os.replace(path, trash)  # atomic: a half-deleted folder never carries a checkpoint name
                shutil.rmtree(trash, ignore_errors=True)

    def _remove_temporaries(self) -> None:
        """Remove leftovers of interrupted saves and deletions."""
        for entry in self.root.iterdir():
            if _TEMPORARY.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
