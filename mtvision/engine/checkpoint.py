"""Atomic training checkpoints that never unpickle: tensors in safetensors, everything else in typed JSON.

Design. A checkpoint is a folder holding two files:

- ``tensors.safetensors``: every tensor of the state, under its dotted path (``optimizer.state.0.exp_avg``),
  streamed tensor by tensor (no second in-memory copy of the whole state);
- ``state.json``: the rest of the state as JSON, with each tensor replaced by ``{"__tensor__": key}``, plus
  the size and SHA-256 of the tensor file. It is written last, so a folder with a readable ``state.json``
  is complete, and the checksum catches truncated or damaged tensor files.

JSON loses Python types that state dicts rely on, so they are tagged: tuples (``betas``) as
``{"__tuple__": [...]}``, dicts with non-string keys (``optimizer['state']`` has int keys) as
``{"__items__": [[key, value], ...]}``, non-finite floats as ``{"__float__": "nan"}`` and numpy arrays as
``{"__ndarray__": key}`` (stored as tensors). numpy scalars become Python numbers; OrderedDicts become dicts
(``state_dict()._metadata`` is dropped, as with any safetensors model file). Any other object is refused at
save time. This was chosen over ``torch.save`` + ``torch.load(weights_only=True)`` because loading then
involves no pickle machinery at all: a file that is not JSON + safetensors is rejected, not interpreted.

The folder is built under a temporary name next to its destination (files fsynced), then renamed into
place and the parent folder fsynced, so a crash or a full disk leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors
import safetensors.torch
import torch

from mtvision.atomic import _fsync_dir, _temp_name, _write_file, atomic_write_bytes
from mtvision.errors import MTVisionError

FORMAT = "mtvision-checkpoint"
VERSION = 1
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"

_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__"
_TAGS = frozenset({_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT})
_CHUNK = 1 << 22

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class CheckpointError(MTVisionError):
    """A checkpoint that is missing, truncated, corrupt, not an mtvision checkpoint, or not storable."""


# ----------------------------------------------------------------------------------------------------------
# typed JSON encoding


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-able data; tensors are moved into `tensors` under a unique dotted key."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {_FLOAT: repr(float(value))}
    if isinstance(value, np.generic):
        return _encode(value.item(), where, tensors)
    if isinstance(value, torch.Tensor):
        return {_TENSOR: _add_tensor(value, where, tensors)}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"cannot store a numpy array of objects at {where or '<root>'!r}")
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise CheckpointError(
                f"cannot store a numpy array of dtype {value.dtype} at {where or '<root>'!r}"
            ) from exc
        return {_NDARRAY: _add_tensor(tensor, where, tensors)}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, _join(where, i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(where, i), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: _encode(v, _join(where, k), tensors) for k, v in value.items()}
        for k in value:
            if not _plain_key(k):
                raise CheckpointError(f"cannot store the dict key {k!r} ({type(k).__name__}) at {where or '<root>'!r}")
        return {_ITEMS: [[_encode(k, "", {}), _encode(v, _join(where, k), tensors)] for k, v in value.items()]}
    raise CheckpointError(
        f"cannot store a {type(value).__name__} at {where or '<root>'!r}: checkpoints hold tensors, numpy arrays, "
        "numbers, strings, bools, None, lists, tuples and dicts only"
    )


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _plain_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_plain_key(k) for k in key)
    return key is None or isinstance(key, (bool, int, float, str))


def _add_tensor(tensor: torch.Tensor, where: str, tensors: dict[str, torch.Tensor]) -> str:
    if tensor.layout != torch.strided:
        raise CheckpointError(f"cannot store a {tensor.layout} tensor at {where!r}; make it dense first")
    if tensor.dtype not in _DTYPES:
        raise CheckpointError(f"cannot store a tensor of dtype {tensor.dtype} at {where!r}")
    key = where or "tensor"
    n = 1
    while key in tensors:
        key, n = f"{where}#{n}", n + 1
    tensors[key] = tensor.detach()
    return key


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag in (_TENSOR, _NDARRAY):
            if not isinstance(inner, str) or inner not in tensors:
                raise CheckpointError(f"the tensor file has no entry {inner!r}")
            used.add(inner)
            return tensors[inner] if tag == _TENSOR else tensors[inner].cpu().numpy()
        if tag == _TUPLE:
            return tuple(_decode(v, tensors, used) for v in inner)
        if tag == _ITEMS:
            return {_hashable(_decode(k, tensors, used)): _decode(v, tensors, used) for k, v in inner}
        if tag == _FLOAT:
            return float(inner)
    return {k: _decode(v, tensors, used) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise CheckpointError(f"malformed dict key {key!r}")
    return key


# ----------------------------------------------------------------------------------------------------------
# safetensors streaming


class _HashingWriter:
    """Forwards writes to a file while counting bytes and computing their SHA-256."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.size, self.sha = fh, 0, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)


def _write_safetensors(out: _HashingWriter, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` in the safetensors format, one tensor at a time."""
    if sys.byteorder != "little":
        raise CheckpointError("checkpoints are written on little-endian machines only")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    out.write(struct.pack("<Q", len(head)))
    out.write(head)
    for tensor in tensors.values():
        flat = tensor.to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        data = memoryview(flat.numpy())
        for start in range(0, len(data), _CHUNK):
            out.write(data[start : start + _CHUNK])


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` as the checkpoint folder `path` (replacing an existing one atomically); returns `path`.

    `state` usually holds model/optimizer/scheduler/scaler/weighting/calibrator state dicts (or None),
    'rng' (see `capture_rng_state`), 'epoch', 'step', 'sampler', 'config', 'metrics' and 'best'.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(dict(state), "", tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    os.mkdir(tmp)
    old: Path | None = None
    try:
        info: dict[str, Any] = {"file": TENSORS_FILE}

        def write_tensors(fh: BinaryIO) -> None:
            out = _HashingWriter(fh)
            _write_safetensors(out, tensors)
            info.update(bytes=out.size, sha256=out.sha.hexdigest())

        _write_file(tmp / TENSORS_FILE, write_tensors)
        manifest = {"format": FORMAT, "version": VERSION, "tensors": info, "state": encoded}
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":")).encode("utf-8")
        _write_file(tmp / STATE_FILE, lambda fh: fh.write(text))
        _fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            old = _temp_name(path, "old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _resolve_folder(path: Path) -> Path:
    if path.is_file():
        if path.name in (STATE_FILE, TENSORS_FILE):
            return path.parent
        raise CheckpointError(
            f"{path} is not an mtvision checkpoint: expected a folder with {STATE_FILE} and {TENSORS_FILE} "
            "(pickle-based files such as .pt/.pth are never loaded)"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _read_manifest(state_file: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(state_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint: {state_file} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"corrupt or truncated checkpoint file {state_file}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{state_file} is not an mtvision checkpoint manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CheckpointError(
            f"{state_file} has checkpoint format version {manifest.get('version')!r}; this mtvision reads <= {VERSION}"
        )
    info = manifest.get("tensors")
    if not isinstance(info, dict) or not {"bytes", "sha256"} <= set(info) or "state" not in manifest:
        raise CheckpointError(f"{state_file} is missing required entries")
    return manifest


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """The state saved by `save_checkpoint`, with its types (tuples, int keys, tensors) restored.

    `path` is the checkpoint folder (or a file inside it). Tensors are placed on `map_location`.
    `verify` checks the tensor file's SHA-256. Raises CheckpointError naming the bad file.
    """
    folder = _resolve_folder(Path(path))
    manifest = _read_manifest(folder / STATE_FILE)
    tensor_file = folder / TENSORS_FILE
    info = manifest["tensors"]
    try:
        size = tensor_file.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint: {tensor_file} is missing") from None
    if size != info["bytes"]:
        raise CheckpointError(
            f"truncated or damaged checkpoint file {tensor_file}: {size} bytes, expected {info['bytes']}"
        )
    if verify and _file_digest(tensor_file) != info["sha256"]:
        raise CheckpointError(f"damaged checkpoint file {tensor_file}: SHA-256 does not match {folder / STATE_FILE}")
    try:
        tensors = safetensors.torch.load_file(tensor_file, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {tensor_file}: {exc}") from exc
    if str(map_location) != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    used: set[str] = set()
    try:
        state = _decode(manifest["state"], tensors, used)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed checkpoint file {folder / STATE_FILE}: {exc}") from exc
    if used != set(tensors) or not isinstance(state, dict):
        raise CheckpointError(f"{tensor_file} does not match {folder / STATE_FILE} (unreferenced tensors)")
    return state


# ----------------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's `random`, numpy's global RNG, torch's CPU RNG and the current CUDA device's RNG.

    Python and numpy states are plain JSON-able values; torch states are uint8 tensors. The CUDA entry is
    None unless CUDA is initialised (one device per process, as under torchrun).
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state(torch.cuda.current_device())
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
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
    except (KeyError, TypeError, ValueError) as exc:
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
        """Complete checkpoint folders, oldest step first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
        return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]

    def latest(self) -> Path | None:
        """The last saved checkpoint (falling back to the newest complete folder), or None."""
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
        return path if (path / STATE_FILE).is_file() else None

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
