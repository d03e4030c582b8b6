"""Pieces shared by the gradient calibrators: per-task losses checked, flat gradient helpers, the
blockwise float64 Gramian, the record of one calibrated step, and the rank-wide reductions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.errors import MTVisionError

GRAMIAN_BLOCK = 1 << 20
"""Gradient entries per block when the Gramian is accumulated in float64."""


class CalibrationError(MTVisionError, ValueError):
    """The model, losses or level do not allow gradient calibration."""


@dataclass
class CalibrationStats:
    """What one calibrated backward pass saw: task weights, the (unscaled, global) Gramian and cosines."""

    weights: dict[str, float]
    gramian: Tensor
    cosines: Tensor
    finite: bool = True

    @property
    def condition_number(self) -> float:
        """λ_max / λ_min of the Gramian (inf when singular, nan when not finite)."""
        k = self.gramian.double().numpy()
        if not np.isfinite(k).all():
            return float("nan")
        eig = np.linalg.eigvalsh(0.5 * (k + k.T))
        top = float(eig[-1])
        if top <= 0:
            return float("inf")
        low = float(eig[0])
        return top / low if low > top * 1e-15 else float("inf")

    def scalars(self) -> dict[str, float]:
        """Flat values for loggers: `weight/<task>`, `cos/<a>~<b>` and `gramian_cond`."""
        names = list(self.weights)
        out = {f"weight/{t}": w for t, w in self.weights.items()}
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                out[f"cos/{names[i]}~{names[j]}"] = float(self.cosines[i, j])
        out["gramian_cond"] = self.condition_number
        return out


def calibration_stats(names: Sequence[str], weights: Tensor, gramian: Tensor, finite: bool) -> CalibrationStats:
    """The `CalibrationStats` of task `names` with `weights` and their Gramian."""
    g = gramian.detach().double().cpu()
    norms = g.diagonal().clamp_min(0).sqrt()
    cosines = g / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return CalibrationStats({n: float(w) for n, w in zip(names, weights)}, g, cosines, finite)


def task_order(losses: Mapping[str, Tensor]) -> list[str]:
    """The task names of `losses`, after checking each is a scalar that requires grad."""
    if not losses:
        raise CalibrationError("calibration needs at least one task loss")
    for t, v in losses.items():
        if not isinstance(v, Tensor) or v.numel() != 1:
            raise CalibrationError(f"loss of task {t!r} must be a scalar tensor")
        if not v.requires_grad:
            raise CalibrationError(f"loss of task {t!r} does not require grad: compute it inside the training graph")
    return list(losses)


def split_flat(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Views of a flat vector shaped like each of `params`, in order."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def flatten(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """`grads` (None: zeros shaped like its parameter) concatenated into one flat vector."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def accumulate_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    """Add `grads` into the parameters' `.grad` (None entries are skipped)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def gramian(per_task: Sequence[Sequence[Tensor]], block: int = GRAMIAN_BLOCK) -> Tensor:
    """K = G Gᵀ of T gradients, each given as a list of tensors (the same shapes for every task),
    accumulated in float64 over blocks, without a float64 copy of the whole T x N matrix (at
    448x576 that copy alone would be about 1 GB)."""
    t = len(per_task)
    out = torch.zeros(t, t, dtype=torch.float64, device=per_task[0][0].device)
    for i in range(len(per_task[0])):
        rows = torch.stack([gs[i].reshape(-1) for gs in per_task])
        for part in rows.split(block, dim=1):
            part = part.double()
            out += part @ part.T
    return out


def world() -> int:
    """The number of processes of the run (1 when not distributed)."""
    return dist.world_size()


def average_across_ranks(flat: Tensor) -> Tensor:
    """`flat` averaged over the ranks in place (unchanged in one process)."""
    if dist.world_size() > 1:
        dist.all_reduce_mean_(flat)
    return flat


def upstream_parameters(tensors: Iterable[Tensor]) -> set[int]:
    """ids of the leaf tensors (parameters) that `tensors` were computed from (an autograd graph walk)."""
    seen: set[int] = set()
    found: set[int] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(n for n, _ in node.next_functions)
    return found


def gradient_presence(params: Sequence[nn.Parameter]) -> Tensor:
    """1.0 for each parameter of `params` that holds a gradient, else 0.0 (summed over ranks, this
    says which gradients `average_gradients` must average)."""
    device = params[0].device if params else torch.device("cpu")
    return torch.tensor([float(p.grad is not None) for p in params], device=device)


def average_gradients(params: Sequence[nn.Parameter], present: Sequence[float] | None = None) -> None:
    """Average `.grad` of `params` across ranks in one flat all-reduce, in place.

    Every rank must pass the same parameters in the same order.  A parameter without a gradient on
    some rank counts as zero there when another rank has one; parameters no rank computed a
    gradient for keep None.  `present`: `gradient_presence(params)` already summed over the ranks
    (None: one small all-reduce computes it here)."""
    if dist.world_size() < 2 or not params:
        return
    if present is None:
        flags = gradient_presence(params)
        dist.all_reduce_sum_(flags)
        present = flags.tolist()
    chosen = [p for p, n in zip(params, present) if n > 0]
    if not chosen:
        return
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in chosen])
    dist.all_reduce_mean_(flat)
    for p, part in zip(chosen, split_flat(flat, chosen)):
        p.grad.copy_(part)
