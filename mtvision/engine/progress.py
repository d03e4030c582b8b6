"""Progress reporting for training and evaluation loops: a tqdm bar on a terminal, plain lines elsewhere.

Plain mode (logs, CI, non-TTY streams) prints one line every `interval` steps, for example::

    train: step 120/1000 (12%) | loss 0.532 | semseg 0.21 | lr 1.0e-03 | 48.2 img/s | eta 3m12s

Throughput and ETA come from a moving rate over the last `window` updates, so a slow first step
(data-loader start-up, cudnn autotuning) stops skewing the estimate once it leaves the window.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, TextIO

from mtvision.errors import MTVisionError

ProgressMode = Literal["auto", "tqdm", "plain"]
_MODES = ("auto", "tqdm", "plain")
_FALSE_VALUES = ("", "0", "false", "no")


def format_duration(seconds: float) -> str:
    """A short duration: '45s', '3m12s', '1h02m' ('?' when unknown, i.e. negative or not finite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def format_value(key: str, value: Any) -> str:
    """A postfix value for display: learning rates as '1.0e-03', other floats to 3 significant digits."""
    if isinstance(value, (bool, int, str)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if key == "lr" or key.startswith("lr"):
        return f"{value:.1e}"
    text = f"{value:.3g}"
    return f"{value:.2e}" if "e" in text else text


def resolve_mode(mode: ProgressMode, stream: TextIO) -> Literal["tqdm", "plain"]:
    """'auto' becomes 'tqdm' on an interactive stream outside CI, 'plain' otherwise."""
    if mode not in _MODES:
        raise MTVisionError(f"unknown progress mode {mode!r} (valid: {', '.join(_MODES)})")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    interactive = bool(isatty()) if callable(isatty) else False
    in_ci = os.environ.get("CI", "").strip().lower() not in _FALSE_VALUES
    return "tqdm" if interactive and not in_ci else "plain"


class Progress:
    """Step counter with loss/lr postfix, images/s and ETA; a no-op when `enabled` is False (non-zero ranks).

    Args:
        total: number of steps expected.
        desc: label shown before the counter ('train', 'eval', 'epoch 3').
        mode: 'tqdm', 'plain' or 'auto' (see `resolve_mode`).
        interval: plain mode prints a line every `interval` steps (and on reaching `total`).
        enabled: False prints nothing at all.
        stream: where to write.
        images_per_step: images in one step (the batch size), for the img/s figure.
        window: number of recent updates the moving rate is computed over.
        clock: monotonic time source in seconds (injectable for tests).
        initial: steps already done (a resumed run): counted in the position, not in the rate.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        mode: ProgressMode = "auto",
        interval: int = 20,
        enabled: bool = True,
        stream: TextIO | None = None,
        *,
        images_per_step: int = 1,
        window: int = 50,
        clock: Callable[[], float] = time.monotonic,
        initial: int = 0,
    ) -> None:
        if total < 0:
            raise MTVisionError(f"progress total must be >= 0, got {total}")
        if interval < 1 or window < 1 or images_per_step < 1:
            raise MTVisionError("progress interval, window and images_per_step must be >= 1")
        self.total = total
        self.desc = desc
        self.interval = interval
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.images_per_step = images_per_step
        self.clock = clock
        if not 0 <= initial <= total:
            raise MTVisionError(f"progress initial must be in [0, total={total}], got {initial}")
        self.count = initial
        self.images = 0
        self.postfix: dict[str, Any] = {}
        self.mode = resolve_mode(mode, self.stream)
        self._history: deque[tuple[float, int, int]] = deque([(clock(), initial, 0)], maxlen=window + 1)
        self._printed_count = initial
        self._closed = False
        self._bar = None
        if enabled and self.mode == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------ rates
    def steps_per_second(self) -> float:
        """Steps per second over the moving window (nan before any time has passed)."""
        (t0, c0, _), (t1, c1, _) = self._history[0], self._history[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else math.nan

    def images_per_second(self) -> float:
        """Images per second over the moving window (nan before any time has passed)."""
        (t0, _, i0), (t1, _, i1) = self._history[0], self._history[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 else math.nan

    def eta_seconds(self) -> float:
        """Seconds left at the moving rate (nan when the rate is unknown or zero)."""
        rate = self.steps_per_second()
        if not rate > 0:
            return math.nan
        return max(self.total - self.count, 0) / rate

    # ------------------------------------------------------------ reporting
    def update(self, n: int = 1, *, images: int | None = None, **postfix: Any) -> None:
        """Advance by `n` steps (`images` defaults to n * images_per_step) and set the shown values."""
        self.count += n
        self.images += n * self.images_per_step if images is None else images
        self.postfix.update(postfix)
        self._history.append((self.clock(), self.count, self.images))
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix_text(with_eta=False), refresh=False)
            self._bar.update(n)
        elif self.count // self.interval > self._printed_count // self.interval or self.count == self.total:
            self._print_line()

    def line(self) -> str:
        """The current plain-mode status line."""
        percent = f" ({100 * self.count // self.total}%)" if self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        return f"{head}step {self.count}/{self.total}{percent} | {self._postfix_text(with_eta=True)}"

    def write(self, text: str) -> None:
        """Print a message without breaking the bar (nothing when disabled)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish: close the bar, or print the last line if steps went unreported since the previous one."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count != self._printed_count:
            self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _postfix_text(self, with_eta: bool) -> str:
        parts = [f"{key} {format_value(key, value)}" for key, value in self.postfix.items()]
        ips = self.images_per_second()
        parts.append(f"{ips:.1f} img/s" if math.isfinite(ips) else "? img/s")
        if with_eta:
            parts.append(f"eta {format_duration(self.eta_seconds())}")
        return " | ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._printed_count = self.count
