"""The output folder of a run or a search: checked for writability and free space before any work,
refused when it already holds results (unless resuming or overwriting) or when another live run
holds its lock, created, or emptied first with overwrite."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from mtvision import distributed as dist
from mtvision.atomic import atomic_write_bytes as write_file_atomically
from mtvision.errors import MTVisionError


class RunFolderError(MTVisionError, ValueError):
    """The output folder does not fit the request (in use without --resume/--overwrite, nothing to resume)."""


def check_output_dir(path: str | Path, resume: bool = False, overwrite: bool = False, *, resumable: bool = True) -> bool:
    """Whether `path` already holds results; refuses them unless resuming or overwriting.

    `resumable`: whether the tool can continue a folder (training can, a search cannot), for the hint."""
    out = Path(path)
    used = out.exists() and any(p.name != LOCK_NAME for p in out.iterdir())
    if used and not (resume or overwrite):
        how = "pass --resume to continue it or --overwrite to replace it" if resumable else "pass --overwrite to replace it"
        raise RunFolderError(f"output_dir {str(out)!r} already holds results; {how}")
    return used


def prepare_output_dir(path: str | Path, resume: bool, overwrite: bool, is_main: bool, *, resumable: bool = True) -> Path:
    """The output folder, created (or emptied first with `overwrite`); see `check_output_dir`.
    Every rank must call it (it ends with a barrier); only the main process touches the disk."""
    out = Path(path)
    if is_main:  # the other ranks checked at start-up; checking again would race the rmtree
        if check_output_dir(out, resume, overwrite, resumable=resumable) and overwrite and not resume:
            for entry in out.iterdir():  # everything but this run's lock
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


LOCK_NAME = ".lock"
MIN_FREE_BYTES = 64 << 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunLock:
    """One run per output folder: `out/.lock` holds the owner's PID, host and start time.

    `acquire` refuses while the owner is alive (on this host), takes a stale lock over with a
    warning, and refuses a lock from another host (its process cannot be checked from here).
    `release` removes the lock if it is still ours."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> dict | None:
        """The current lock's record, or None when there is none (or it cannot be read)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def check(self) -> None:
        """RunFolderError when a live run holds the folder; a warning for a stale lock."""
        held = self.holder()
        if held is None or (held.get("pid") == self.mine["pid"] and held.get("host") == self.mine["host"]):
            return
        pid, host = held.get("pid"), held.get("host")
        if host != self.mine["host"]:
            raise RunFolderError(
                f"output_dir {str(self.path.parent)!r} is locked by process {pid} on host {host!r} (started "
                f"{held.get('started')}); if that run is gone, delete {self.path}"
            )
        if isinstance(pid, int) and _alive(pid):
            raise RunFolderError(
                f"output_dir {str(self.path.parent)!r} is in use by process {pid} on this host (started "
                f"{held.get('started')}): wait for it, stop it, or use another output_dir"
            )
        warnings.warn(f"taking over the stale lock of process {pid} (no longer running) in {self.path}", stacklevel=2)

    def acquire(self) -> None:
        """Check, then write our lock (creating the folder)."""
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(self.path, (json.dumps(self.mine) + "\n").encode("utf-8"))

    def release(self) -> None:
        held = self.holder()
        if held is not None and held.get("pid") == self.mine["pid"] and held.get("host") == self.mine["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def check_writable(path: str | Path, min_free: int = MIN_FREE_BYTES) -> None:
    """RunFolderError naming the path and the problem when files cannot be written there (a
    read-only or forbidden folder) or its disk has less than `min_free` bytes free."""
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        probe = existing / f".mtvision-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write to {str(existing)!r} (for output_dir {str(target)!r}): {exc.strerror or exc}") from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise RunFolderError(
            f"only {free / 2**20:.0f} MiB free on the disk of {str(existing)!r}, and output_dir {str(target)!r} "
            f"needs at least {min_free / 2**20:.0f} MiB: free some space or choose another output_dir"
        )
