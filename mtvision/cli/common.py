"""What the config-driven entry points (`mtv-train`, `mtv-search`) share: override checks and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from mtvision.errors import MTVisionError


def run_config_command(prog: str, overrides: Sequence[str], example: str, run: Callable[[], object]) -> int:
    """Check `key=value` overrides, call `run()`, and turn its errors into a message and an exit code:
    2 for bad input (a missing file, a bad config or value), 1 for other failures, 0 on success."""
    for item in overrides:
        if "=" not in item:
            print(f"{prog}: override {item!r} must look like key=value (e.g. {example})", file=sys.stderr)
            return 2
    try:
        run()
    except FileNotFoundError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except MTVisionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    return 0
