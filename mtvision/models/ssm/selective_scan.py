"""Mamba's selective scan (S6) in pure PyTorch, with the CUDA kernel of `mamba_ssm` when present.

The recurrence, per batch b, channel d and state n (Gu & Dao 2023, "Mamba", Alg. 2):

    h_l = exp(Δ_l A) h_{l-1} + Δ_l B_l u_l,        y_l = C_l · h_l + D u_l,        out = y * silu(z)

with Δ = softplus(delta + delta_bias) when asked.  The signature and semantics follow
`mamba_ssm.ops.selective_scan_interface.selective_scan_fn`: u, delta (B, D, L); A (D, N), real;
B, C of shape (D, N) (input independent), (B, N, L) or (B, G, N, L) (G groups of D/G channels);
D (D,); z (B, D, L); delta_bias (D,).  The output has u's dtype, computation is in float32 (float64
inputs stay float64).

`selective_scan_reference` is the sequential loop over positions (the ground truth).
`selective_scan_chunked` is the fast pure-PyTorch form: within chunks of T positions the states are
`exp(s_l) * cumsum_k(exp(-s_k) x_k)` with s the cumulative log-decay, rescaled around the chunk's
middle value so every factor stays within exp(±60); the chunk boundary states are carried by a short
loop over chunks.  T is the largest power of two <= `chunk_size` that keeps every chunk's log-decay
range within that bound (so strong decays mean shorter chunks, never overflow).  With A <= 0 and
Δ >= 0 (Mamba's case), a single step's log-decay is floored at -30 (a factor below 1e-13, i.e. a
reset of the state to within float32 resolution), which bounds T from below by 4.
`selective_scan` picks the CUDA kernel for CUDA tensors when `mamba_ssm` imports, else the chunked
form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

try:  # the fused CUDA kernel is optional, never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except Exception:  # ImportError, or a broken CUDA build
    _mamba_scan_fn = None

HAS_MAMBA_SSM = _mamba_scan_fn is not None
MAX_EXPONENT = 60.0  # |log| of every rescaling factor in a chunk (e^60 ~ 1e26, far from float32 overflow)
MIN_STEP_LOG_DECAY = -30.0  # e^-30 ~ 1e-13: a stronger single-step decay is a reset at float32 resolution
BLOCK_ELEMENTS = 1 << 24  # channels are processed in blocks of at most this many state elements


def _prepare(u: Tensor, delta: Tensor, A: Tensor, delta_bias: Tensor | None, delta_softplus: bool):
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the pure PyTorch selective scan")
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.to(dtype), dtype


def _channel_view(M: Tensor, channels: slice, dim: int, dtype: torch.dtype) -> Tensor:
    """B or C as a (batch|1, channels|1, N, L|1) tensor for the channels of `channels`."""
    M = M.to(dtype)
    if M.dim() == 2:  # (D, N): the same for every position
        return M[channels][None, :, :, None]
    if M.dim() == 3:  # (B, N, L): shared by all channels
        return M[:, None]
    if M.dim() == 4:  # (B, G, N, L): channel d reads group d // (D / G)
        groups = M.shape[1]
        if dim % groups:
            raise ValueError(f"{dim} channels cannot be split into {groups} groups")
        index = torch.arange(channels.start, channels.stop, device=M.device) // (dim // groups)
        return M.index_select(1, index)
    raise ValueError(f"B and C must have 2, 3 or 4 dimensions, got shape {tuple(M.shape)}")


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_out: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan as a sequential loop over positions (slow; the ground truth)."""
    dtype_in = u.dtype
    u, delta, A, dtype = _prepare(u, delta, A, delta_bias, delta_softplus)
    dim, length = u.shape[1], u.shape[2]
    Bv = _channel_view(B, slice(0, dim), dim, dtype)  # (b|1, d|1, N, L|1)
    Cv = _channel_view(C, slice(0, dim), dim, dtype)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for i in range(length):
        Bi = Bv[..., i if Bv.shape[-1] > 1 else 0]
        Ci = Cv[..., i if Cv.shape[-1] > 1 else 0]
        d_i = delta[:, :, i, None]
        h = torch.exp(d_i * A) * h + d_i * Bi * u[:, :, i, None]
        ys.append((h * Ci).sum(-1))
    y = _finish(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (y, h) if return_last_state else y


def _chunk_length(delta: Tensor, A: Tensor, chunk_size: int, monotone: bool) -> int:
    """Largest power of two <= chunk_size whose chunks keep the log-decay range within the bound."""
    step = delta.detach().abs() * A.detach().abs().amax(1)[:, None]  # (b, d, L): an upper bound of |Δ A| per position
    if monotone:
        step = step.clamp(max=-MIN_STEP_LOG_DECAY)
    # the rescaling sits in the middle of a monotone chunk's range, so it may span twice the bound
    limit = 2 * MAX_EXPONENT if monotone else MAX_EXPONENT
    T = 1 << max(0, int(math.floor(math.log2(max(1, chunk_size)))))
    length = delta.shape[-1]
    while T > 1:
        pad = (-length) % T
        sums = F.pad(step, (0, pad)).unflatten(-1, (-1, T)).sum(-1)
        if float(sums.detach().amax()) <= limit:
            break
        T //= 2
    return T


def _scan_block(u: Tensor, delta: Tensor, A: Tensor, Bv: Tensor, Cv: Tensor, T: int, monotone: bool):
    """Chunked scan of one block of channels; returns y (b, d, L) and the last state (b, d, N).

    Layout (b, d, N, chunks, T): per-position factors broadcast over N, the scan runs along T.
    """
    b, d, length = u.shape
    pad = (-length) % T
    if pad:  # Δ = 0 and u = 0 leave the state unchanged
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        Bv = F.pad(Bv, (0, pad)) if Bv.shape[-1] > 1 else Bv
        Cv = F.pad(Cv, (0, pad)) if Cv.shape[-1] > 1 else Cv
    chunks = (length + pad) // T

    def split(t: Tensor) -> Tensor:  # (.., L|1) -> (.., chunks|1, T|1)
        return t.unflatten(-1, (chunks, T)) if t.shape[-1] > 1 else t.unsqueeze(-1)

    A5 = A[None, :, :, None, None]  # (1, d, N, 1, 1)
    dl = delta.unflatten(2, (chunks, T))[:, :, None]  # (b, d, 1, c, T)
    if monotone and float(dl.detach().amax()) * float(A.detach().abs().amax()) > -MIN_STEP_LOG_DECAY:
        s = torch.cumsum((dl * A5).clamp(min=MIN_STEP_LOG_DECAY), dim=-1)  # cumulative log-decay
        ref = 0.5 * (s[..., :1] + s[..., -1:])
        centred, s_end = s - ref, s[..., -1]
    else:  # s = A * cumsum(Δ): centre on the small cumsum before broadcasting over N
        S = dl.cumsum(-1)
        mid = 0.5 * (S[..., :1] + S[..., -1:])
        centred, ref = (S - mid) * A5, mid * A5
        s_end = S[..., -1] * A[None, :, :, None]
    E = torch.exp(centred)  # exp(s_l - ref), within exp(±MAX_EXPONENT)
    x = split(Bv) * (dl * u.unflatten(2, (chunks, T))[:, :, None])  # Δ_k B_k u_k
    acc = torch.cumsum(torch.exp(-centred) * x, dim=-1)  # Σ_{k<=l} exp(ref - s_k) x_k
    # states at chunk ends with zero initial state, and the decay across each chunk
    end_local = E[..., -1] * acc[..., -1]  # (b, d, N, c)
    decay = torch.exp(s_end)
    h = u.new_zeros(b, d, A.shape[1])
    entering = []
    for c in range(chunks):
        entering.append(h)
        h = decay[..., c] * h + end_local[..., c]
    h_in = torch.stack(entering, dim=-1)[..., None]  # (b, d, N, c, 1)
    states = E * (acc + torch.exp(ref) * h_in)  # exp(s_l) h_in = E_l exp(ref) h_in
    y = (states * split(Cv)).sum(2).flatten(2)[:, :, :length]
    return y, h


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = 64,
    checkpoint: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan in chunks of up to `chunk_size` positions (pure PyTorch, CPU or CUDA).

    `checkpoint` (default: whenever gradients are needed) recomputes each block of channels in the
    backward pass instead of keeping its (B, D, L, N) intermediates, bounding the memory to one block.
    """
    dtype_in = u.dtype
    u, delta, A, dtype = _prepare(u, delta, A, delta_bias, delta_softplus)
    dim, length = u.shape[1], u.shape[2]
    if length == 0:
        raise ValueError("the sequence is empty (L = 0)")
    monotone = bool((A.detach() <= 0).all()) and bool((delta.detach() >= 0).all())
    T = _chunk_length(delta, A, chunk_size, monotone)
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C))
    per_channel = u.shape[0] * (length + T) * A.shape[1]
    block = max(1, min(dim, BLOCK_ELEMENTS // per_channel))
    ys, states = [], []
    for start in range(0, dim, block):
        ch = slice(start, min(dim, start + block))
        args = (u[:, ch], delta[:, ch], A[ch], _channel_view(B, ch, dim, dtype), _channel_view(C, ch, dim, dtype))
        if checkpoint:
            y, h = _checkpoint(_scan_block, *args, T, monotone, use_reentrant=False)
        else:
            y, h = _scan_block(*args, T, monotone)
        ys.append(y)
        states.append(h)
    y = _finish(torch.cat(ys, 1) if len(ys) > 1 else ys[0], u, D, z, dtype_in)
    if return_last_state:
        return y, torch.cat(states, 1) if len(states) > 1 else states[0]
    return y


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`mamba_ssm`'s fused kernel for CUDA tensors when it is installed, else `selective_scan_chunked`."""
    if HAS_MAMBA_SSM and u.is_cuda:
        return _mamba_scan_fn(
            u.contiguous(), delta.contiguous(), A.float(), B.contiguous(), C.contiguous(),
            None if D is None else D.float(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state,
        )  # fmt: skip
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
