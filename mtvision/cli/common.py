"""What the entry points share: argument parsing with options anywhere, override checks, and one
convention of messages and exit codes.

Exit codes, the same for every tool: 0 success; 2 a usage or config error (a bad argument, a
missing or malformed file, an invalid value: fix the command); 1 a runtime failure (an OS error
such as a full disk, a training that cannot go on); 130 interrupted (a second Ctrl-C).  Errors are
one line, `prog: message`, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mtvision.errors import MTVisionError

USAGE, FAILURE, INTERRUPTED = 2, 1, 130


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with flags before, between or after the positional overrides (`CFG --overwrite a=1`)."""
    return parser.parse_intermixed_args(argv)


def os_error_message(exc: OSError) -> str:
    """One line naming the path and the problem of an OS error."""
    where = exc.filename if exc.filename is not None else "a file"
    problem = exc.strerror or str(exc)
    hint = " (free some space; earlier checkpoints are intact, resume with --resume)" if exc.errno == errno.ENOSPC else ""
    return f"cannot write or read {where}: {problem}{hint}"


def run_command(prog: str, run: Callable[[], object], overrides: Sequence[str] = (), example: str = "") -> int:
    """Check `key=value` overrides, call `run()`, and turn its errors into one line and an exit code
    (see the module docstring)."""
    for item in overrides:
        if "=" not in item:
            print(f"{prog}: override {item!r} must look like key=value (e.g. {example})", file=sys.stderr)
            return USAGE
    try:
        run()
    except FileNotFoundError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return USAGE
    except MTVisionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", USAGE if isinstance(exc, ValueError) else FAILURE)
    except OSError as exc:
        print(f"{prog}: {os_error_message(exc)}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted{f' ({exc})' if str(exc) else ''}; nothing was saved at this point", file=sys.stderr)
        return INTERRUPTED
    return 0


def find_run_config(target: Path) -> Path | None:
    """The run's config.yaml for a run, pretrained or checkpoint folder `target` (it or up to three
    folders above it), None when there is none."""
    for folder in (target, target.parent, target.parent.parent, target.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None
