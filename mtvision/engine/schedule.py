"""Learning-rate schedules with linear warm-up: poly, cosine, constant and step, as plain functions of
the step (`schedule(step)` is the factor on each group's peak learning rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("poly", "cosine", "constant", "step")


@dataclass
class WarmupSchedule:
    """Multiplicative LR factor at a step: linear warm-up, then poly / cosine / constant decay.

    Warm-up rises linearly from `warmup_ratio` to 1 over `warmup_iters` steps.  After it, poly
    decays as (1 - p)^power and cosine as (1 + cos(pi p)) / 2, where p is the fraction of the
    post-warm-up steps done; both end at `min_ratio` (min_lr / lr).  Step multiplies by `gamma` at
    each of the `milestones` (optimizer steps) reached: gamma ** #{m <= step}.  Nothing to
    checkpoint: a resumed run recomputes the factor from the step.
    """

    total_steps: int
    schedule: str = "poly"
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    power: float = 0.9
    min_ratio: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} (valid: {', '.join(SCHEDULES)})")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_iters <= self.total_steps:
            raise ValueError(f"warmup_iters must be in [0, total_steps={self.total_steps}], got {self.warmup_iters}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_iters
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        decay_steps = max(self.total_steps - self.warmup_iters, 1)
        progress = min((step - self.warmup_iters) / decay_steps, 1.0)
        if self.schedule == "poly":
            shape = (1.0 - progress) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape
