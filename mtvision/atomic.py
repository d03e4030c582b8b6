"""Atomic file writes: a temporary file in the same folder, fsynced, renamed over the target.

On any error (a full disk included) the temporary file is removed and the previous file stays.
No torch import: configs and pretrained folders use it as well as checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _open_new(path: Path) -> BinaryIO:
    """A new file opened for binary writing (permissions follow the umask); the one place files are opened."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def _write_file(path: Path, write_fn: Callable[[BinaryIO], Any]) -> None:
    """Create `path`, fill it with `write_fn(fh)`, flush and fsync it."""
    with _open_new(path) as fh:
        write_fn(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a folder so that renames inside it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.{suffix}"


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any]) -> None:
    """Replace `path` with what `write_fn(fh)` writes, atomically.

    The data goes to a temporary file in the same folder, is fsynced and renamed over `path`; on any error
    (a full disk included) the temporary file is removed and the previous `path` is left untouched.
    """
    atomic_write_path(path, lambda tmp: _write_file(tmp, write_fn))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_path(path: str | os.PathLike, write_to: Callable[[Path], Any]) -> None:
    """Replace `path` with the file `write_to(tmp_path)` creates, atomically (for writers that take
    a file name, such as safetensors' save_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        write_to(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
