"""GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020): the one gradient-manipulation method here that is not a Gramian method.

It acts element-wise, so it needs the per-task gradients themselves: at parameter level, or (as in
the paper) on the per-task gradients of a shared activation.  It is the exception to the
aggregator contract and is a plain function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def graddrop(
    grads: Tensor,
    signs_source: Tensor | None = None,
    leak: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
    batch: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The GradDrop combined gradient of per-task gradients `grads` [T, *shape] → [*shape].

    Sign purity P = ½(1 + Σ_t ∇_t / Σ_t |∇_t|) per element; with one U ~ Uniform[0, 1) per element,
    task t keeps its positive components where P > U and its negative ones where P < U; the result
    is Σ_t M_t ∘ g_t with M_t = ℓ_t + (1 − ℓ_t)·mask_t (leak ℓ, scalar or per task; 0 in the paper).
    signs_source: the activation the gradients are taken at; as in the paper purity and masks are
    computed on sign(A) ∘ ∇_t.  batch=True: dim 1 of `grads` (dim 0 of `signs_source`) is the batch,
    summed before the purity so that one mask is shared by the batch, as the paper does.
    reduce: applied to that batch sum (e.g. an all-reduce, so that DDP ranks share the global mask).
    """
    if grads.ndim < 1 or grads.shape[0] == 0:
        raise ValueError(f"grads must be [T, ...] with T >= 1, got shape {tuple(grads.shape)}")
    if not torch.isfinite(grads).all():
        raise ValueError("grads has non-finite entries")
    t = grads.shape[0]
    lk = torch.as_tensor(leak, dtype=grads.dtype, device=grads.device).reshape(-1)
    if lk.numel() not in (1, t) or (lk < 0).any() or (lk > 1).any():
        raise ValueError(f"leak must be one value or {t} values in [0, 1], got {leak}")
    lk = lk.expand(t).reshape((t,) + (1,) * (grads.ndim - 1))
    signed = grads
    if signs_source is not None:
        if tuple(signs_source.shape) != tuple(grads.shape[1:]):
            raise ValueError(f"signs_source shape {tuple(signs_source.shape)} != gradient shape {tuple(grads.shape[1:])}")
        signed = grads * torch.sign(signs_source).to(grads.dtype).unsqueeze(0)
    if batch:
        if grads.ndim < 2:
            raise ValueError("batch=True needs grads of shape [T, B, ...]")
        signed = signed.sum(dim=1, keepdim=True)
        if reduce is not None:
            signed = reduce(signed)
    purity = 0.5 * (1.0 + signed.sum(0) / signed.abs().sum(0).clamp_min(torch.finfo(grads.dtype).tiny))
    u = torch.rand(purity.shape, generator=generator, dtype=purity.dtype, device="cpu").to(purity.device)
    mask = ((purity > u) & (signed > 0)) | ((purity < u) & (signed < 0))
    mask = lk + (1.0 - lk) * mask.to(grads.dtype)
    return (mask * grads).sum(0)
