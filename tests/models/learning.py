"""A few Adam steps on one batch, for the "this decoder learns" tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def adam_steps(
    model: nn.Module, loss_fn: Callable[[], Tensor], steps: int, lr: float = 2e-3,
    after_first_backward: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """(loss before, loss after) `steps` Adam steps of `loss_fn` on `model`'s parameters."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = loss_fn()
    first.backward()
    if after_first_backward is not None:
        after_first_backward()
    opt.step()
    for _ in range(steps - 1):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first.item(), loss_fn().item()
