"""Atomic writes of files and folders: built under a temporary name next to the target, fsynced, renamed.

On any error (a full disk included) the temporary file or folder is removed and the previous one stays.
No torch import: configs and pretrained folders use it as well as checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
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


def atomic_write_folder(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Replace the folder `path` with the one `fill(tmp_folder)` fills, atomically; returns `path`.

    `fill` writes (and fsyncs) its files into an empty temporary sibling folder; that folder is fsynced and
    renamed to `path`. An existing `path` is first renamed aside and deleted only once the new folder is in
    place (its permission bits carry over); on any error (a full disk included) the temporary folder is
    removed and the previous `path` is left as it was. A crash between the two renames leaves the previous
    folder intact as `.NAME.*.old` next to `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    os.mkdir(tmp)
    old: Path | None = None
    try:
        fill(tmp)
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
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
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return path
