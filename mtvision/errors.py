"""Exceptions that mtvision raises for bad input, so callers can catch one family."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MTVisionError(Exception):
    """Base class of every error mtvision raises on purpose."""


class DatasetError(MTVisionError, ValueError):
    """A dataset file or tree is missing, unreadable or inconsistent."""


class CheckpointError(MTVisionError, ValueError):
    """A training checkpoint or weights file that is missing, incomplete, truncated, damaged, in an
    unsupported format, not storable, or that does not fit the model."""


class UnknownNameError(MTVisionError, KeyError):
    """A name (task, model, option) that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest of `choices` to `name`, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """An UnknownNameError for `name` that lists the valid choices and suggests the closest."""
    choices = sorted(choices)
    hint = closest(name, choices)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    msg += f" (valid: {', '.join(choices)})"
    return UnknownNameError(msg)
