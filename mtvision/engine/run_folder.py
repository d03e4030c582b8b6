"""The output folder of a run or a search: refused when it already holds results (unless resuming
or overwriting), created, or emptied first with overwrite."""

from __future__ import annotations

import shutil
from pathlib import Path

from mtvision import distributed as dist
from mtvision.errors import MTVisionError


class RunFolderError(MTVisionError, ValueError):
    """The output folder does not fit the request (in use without --resume/--overwrite, nothing to resume)."""


def check_output_dir(path: str | Path, resume: bool = False, overwrite: bool = False, *, resumable: bool = True) -> bool:
    """Whether `path` already holds results; refuses them unless resuming or overwriting.

    `resumable`: whether the tool can continue a folder (training can, a search cannot), for the hint."""
    out = Path(path)
    used = out.exists() and any(out.iterdir())
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
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out
