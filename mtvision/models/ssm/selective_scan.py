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
`selective_scan_chunked` lets autograd record that computation (with block checkpointing), so the
backward keeps per-channel copies of B and C and float32 copies of u and Δ.
`selective_scan_recompute` computes the same values with a custom autograd function that keeps only
the inputs as given and the states entering each chunk, (B, D, N, L / T); its backward recomputes
one block of channels at a time from those states and back-propagates through it, carrying the
gradient of the entering states backwards across the chunks.
`selective_scan` picks the CUDA kernel for CUDA tensors when `mamba_ssm` imports, else
`selective_scan_recompute`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint

try:  # the fused CUDA kernel is optional, never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except Exception:  # ImportError, or a broken CUDA build
    _mamba_scan_fn = None

HAS_MAMBA_SSM = _mamba_scan_fn is not None
MAX_EXPONENT = 60.0  # |log| of every rescaling factor in a chunk (e^60 ~ 1e26, far from float32 overflow)
MIN_STEP_LOG_DECAY = -30.0  # e^-30 ~ 1e-13: a stronger single-step decay is a reset at float32 resolution
BLOCK_ELEMENTS = 1 << 24  # channels are processed in blocks of at most this many state elements


def _processed_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """Δ in `dtype`, with its bias added and softplus applied when asked."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _prepare(u: Tensor, delta: Tensor, A: Tensor, delta_bias: Tensor | None, delta_softplus: bool):
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the pure PyTorch selective scan")
    dtype = torch.promote_types(u.dtype, torch.float32)
    return u.to(dtype), _processed_delta(delta, delta_bias, delta_softplus, dtype), A.to(dtype), dtype


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


def _pad_length(t: Tensor, pad: int, broadcast: bool = False) -> Tensor:
    """Zero-pad the sequence (last) dimension; with `broadcast`, a length of 1 (B or C shared by all
    positions) stays as it is."""
    return F.pad(t, (0, pad)) if pad and not (broadcast and t.shape[-1] == 1) else t


def _split(t: Tensor, chunks: int, T: int) -> Tensor:
    """(.., L|1) -> (.., chunks|1, T|1)."""
    return t.unflatten(-1, (chunks, T)) if t.shape[-1] > 1 else t.unsqueeze(-1)


def _chunk_terms(u: Tensor, delta: Tensor, A: Tensor, Bv: Tensor, T: int, monotone: bool):
    """The within-chunk factors of one block of channels whose length is a multiple of T.

    Returns, in the layout (b, d, N, chunks, T): E = exp(s_l - ref) and acc = Σ_{k<=l} exp(ref - s_k) x_k
    (so that the state at l is E_l (acc_l + exp(ref) h_in) for the state h_in entering the chunk),
    exp(ref) (.., chunks, 1) and the decay exp(s_end) across each chunk (b, d, N, chunks).
    """
    chunks = u.shape[-1] // T
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
    x = _split(Bv, chunks, T) * (dl * u.unflatten(2, (chunks, T))[:, :, None])  # Δ_k B_k u_k
    acc = torch.cumsum(torch.exp(-centred) * x, dim=-1)  # Σ_{k<=l} exp(ref - s_k) x_k
    return E, acc, torch.exp(ref), torch.exp(s_end)


def _boundary_states(E: Tensor, acc: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """The states entering each chunk (b, d, N, chunks) and the last state (b, d, N), from a zero state."""
    end_local = E[..., -1] * acc[..., -1]  # states at chunk ends with zero initial state
    h = E.new_zeros(E.shape[:3])
    entering = []
    for c in range(E.shape[3]):
        entering.append(h)
        h = decay[..., c] * h + end_local[..., c]
    return torch.stack(entering, dim=-1), h


def _scan_block(u: Tensor, delta: Tensor, A: Tensor, Bv: Tensor, Cv: Tensor, T: int, monotone: bool):
    """Chunked scan of one block of channels; returns y (b, d, L) and the last state (b, d, N).

    Layout (b, d, N, chunks, T): per-position factors broadcast over N, the scan runs along T.
    """
    length = u.shape[-1]
    pad = (-length) % T  # Δ = 0 and u = 0 leave the state unchanged
    u, delta = _pad_length(u, pad), _pad_length(delta, pad)
    Bv, Cv = _pad_length(Bv, pad, True), _pad_length(Cv, pad, True)
    chunks = (length + pad) // T
    E, acc, exp_ref, decay = _chunk_terms(u, delta, A, Bv, T, monotone)
    h_in, h = _boundary_states(E, acc, decay)
    states = E * (acc + exp_ref * h_in[..., None])  # exp(s_l) h_in = E_l exp(ref) h_in
    y = (states * _split(Cv, chunks, T)).sum(2).flatten(2)[:, :, :length]
    return y, h


def _check_bc(M: Tensor, dim: int) -> int:
    """The number of channels that share one group of a B or C tensor (dim when not grouped)."""
    if M.dim() not in (2, 3, 4):
        raise ValueError(f"B and C must have 2, 3 or 4 dimensions, got shape {tuple(M.shape)}")
    if M.dim() == 4:
        if dim % M.shape[1]:
            raise ValueError(f"{dim} channels cannot be split into {M.shape[1]} groups")
        return dim // M.shape[1]
    return dim


def _block_view(M: Tensor, channels: slice, dim: int) -> Tensor:
    """B or C as a view (batch|1, channels|1, N, L|1) for a block of channels inside one group."""
    if M.dim() == 2:
        return M[channels][None, :, :, None]
    if M.dim() == 3:
        return M[:, None]
    group = channels.start // (dim // M.shape[1])
    return M[:, group, None]


def _add_block_grad(grad: Tensor, g: Tensor, M: Tensor, channels: slice, dim: int) -> None:
    """Accumulate the gradient `g` of `_block_view(M, channels, dim)` into `grad` (M's shape)."""
    if M.dim() == 2:
        grad[channels] += g[0, :, :, 0]
    elif M.dim() == 3:
        grad += g[:, 0]
    else:
        grad[:, channels.start // (dim // M.shape[1])] += g[:, 0]


def _channel_blocks(batch: int, dim: int, length: int, state: int, T: int, span: int) -> list[slice]:
    """Blocks of at most BLOCK_ELEMENTS state elements that never straddle a group of `span` channels."""
    block = max(1, min(span, BLOCK_ELEMENTS // (batch * (length + T) * state)))
    return [slice(s, min(g + span, s + block)) for g in range(0, dim, span) for s in range(g, g + span, block)]


def _block_inputs(raw: tuple, ch: slice, dim: int, dtype: torch.dtype, grad: tuple | None = None) -> list:
    """One block's (u, delta, A, B, C, D, z, delta_bias) in the compute dtype (B and C as views of
    `_block_view`); with `grad`, detached leaves that require grad where `grad` says so."""
    u, delta, A, B, C, D, z, bias = raw
    parts = [u[:, ch], delta[:, ch], A[ch], _block_view(B, ch, dim), _block_view(C, ch, dim)]
    parts += [None if t is None else (t[:, ch] if t.dim() == 3 else t[ch]) for t in (D, z, bias)]
    parts = [None if t is None else t.detach().to(dtype) for t in parts]
    if grad is not None:
        parts = [None if t is None else t.requires_grad_(g) for t, g in zip(parts, grad)]
    return parts


def _block_forward(parts: list, softplus: bool, T: int, monotone: bool, length: int):
    """A block's within-chunk factors (`_chunk_terms`, Δ processed as asked) and its C in chunks."""
    u, delta, A, Bv, Cv, D, z, bias = parts
    delta = _processed_delta(delta, bias, softplus, delta.dtype)
    pad = (-length) % T
    E, acc, exp_ref, decay = _chunk_terms(_pad_length(u, pad), _pad_length(delta, pad), A, _pad_length(Bv, pad, True), T, monotone)
    Cs = _split(_pad_length(Cv, pad, True), (length + pad) // T, T)
    return E, acc, exp_ref, decay, Cs


def _block_output(E, acc, exp_ref, h_in, Cs, parts: list, length: int) -> Tensor:
    """A block's output (D and gate included) from its factors and the states entering its chunks."""
    u, D, z = parts[0], parts[5], parts[6]
    states = E * (acc + exp_ref * h_in[..., None])  # exp(s_l) h_in = E_l exp(ref) h_in
    y = (states * Cs).sum(2).flatten(2)[:, :, :length]
    if D is not None:
        y = y + u * D[:, None]
    return y if z is None else y * F.silu(z)


class _RecomputedScan(torch.autograd.Function):
    """The chunked scan, keeping only its inputs and the states entering each chunk for the backward.

    forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, T, monotone, blocks, dtype) -> (the
    output in `dtype`, the last state); the inputs as the caller gives them (any float dtype; B and C
    in their caller's shape), each block cast to `dtype` when it is computed.  The backward
    recomputes one block of channels at a time from the saved inputs (the states inside a chunk follow
    from the state entering it), carries the gradient of the entering states back across the chunks,
    and back-propagates through the recomputation with those entering states held fixed.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, T, monotone, blocks, dtype):  # type: ignore[override]
        raw = (u, delta, A, B, C, D, z, delta_bias)
        b, dim, length = u.shape
        chunks = -(-length // T)
        out = torch.empty(b, dim, length, dtype=dtype, device=u.device)
        last = torch.empty(b, dim, A.shape[1], dtype=dtype, device=u.device)
        entering = torch.empty(b, dim, A.shape[1], chunks, dtype=dtype, device=u.device)
        for ch in blocks:
            parts = _block_inputs(raw, ch, dim, dtype)
            E, acc, exp_ref, decay, Cs = _block_forward(parts, softplus, T, monotone, length)
            entering[:, ch], last[:, ch] = _boundary_states(E, acc, decay)
            out[:, ch] = _block_output(E, acc, exp_ref, entering[:, ch], Cs, parts, length)
        ctx.save_for_backward(*(t if isinstance(t, Tensor) else None for t in raw), entering)
        ctx.options = softplus, T, monotone, blocks, dtype
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_last):  # type: ignore[override]
        *raw, entering = ctx.saved_tensors
        softplus, T, monotone, blocks, dtype = ctx.options
        need = tuple(ctx.needs_input_grad[:8])
        grads = [torch.zeros(t.shape, dtype=dtype, device=t.device) if n else None for t, n in zip(raw, need)]
        dim, length, chunks = raw[0].shape[1], raw[0].shape[2], entering.shape[-1]
        pad = chunks * T - length
        for ch in blocks if any(need) else ():
            with torch.enable_grad():
                parts = _block_inputs(raw, ch, dim, dtype, need)
                E, acc, exp_ref, decay, Cs = _block_forward(parts, softplus, T, monotone, length)
                h_in, g_out = entering[:, ch], grad_out[:, ch].to(dtype)
                with torch.no_grad():  # gradient of each entering state through its own chunk's outputs,
                    g_y = g_out if parts[6] is None else g_out * F.silu(parts[6])
                    g_y = _split(_pad_length(g_y, pad), chunks, T)[:, :, None]  # (b, d, 1, c, T)
                    local = (E * (Cs * g_y)).sum(-1) * exp_ref[..., 0]  # (b, d, N, c)
                    leaving = torch.empty_like(local)  # then the gradient of each chunk's leaving state
                    g = grad_last[:, ch].to(dtype)
                    for c in range(chunks - 1, -1, -1):
                        leaving[..., c] = g
                        g = local[..., c] + decay[..., c] * g
                out = _block_output(E, acc, exp_ref, h_in, Cs, parts, length)
                end = decay * h_in + E[..., -1] * acc[..., -1]  # each chunk's leaving state
                objective = (out * g_out).sum() + (leaving * end).sum()
                wanted = [t for t, n in zip(parts, need) if n]
                found = iter(torch.autograd.grad(objective, wanted, allow_unused=True))
            for i, n in enumerate(need):
                g = next(found) if n else None
                if g is None:
                    continue
                if i in (0, 1) or (i == 6):  # u, delta, z: (b, d, L)
                    grads[i][:, ch] = g
                elif i in (2, 5, 7):  # A, D, delta_bias: per channel
                    grads[i][ch] = g
                else:  # B, C
                    _add_block_grad(grads[i], g, raw[i], ch, dim)
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, raw)]
        return (*grads, None, None, None, None, None)


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


def selective_scan_recompute(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """`selective_scan_chunked`'s values and gradients with memory bounded by one block of channels.

    For the backward, autograd keeps only the inputs as given (no copies in the compute dtype) and the
    states entering each chunk, (B, D, N, L / T); Δ's bias and softplus, D and the gate are applied
    inside, block by block, and recomputed in the backward.  B and C are read through views, never
    expanded per channel, and blocks never straddle a group of a grouped B or C.
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the pure PyTorch selective scan")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("the sequence is empty (L = 0)")
    dtype = torch.promote_types(u.dtype, torch.float32)
    span = math.gcd(_check_bc(B, dim), _check_bc(C, dim))
    with torch.no_grad():  # the chunk length, from Δ as the blocks will compute it
        dt, A_c = _processed_delta(delta, delta_bias, delta_softplus, dtype), A.to(dtype)
        monotone = bool((A_c <= 0).all()) and bool((dt >= 0).all())
        T = _chunk_length(dt, A_c, chunk_size, monotone)
        del dt
    blocks = tuple(_channel_blocks(batch, dim, length, A.shape[1], T, span))
    y, last = _RecomputedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, T, monotone, blocks, dtype)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


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
    """`mamba_ssm`'s fused kernel for CUDA tensors when it is installed, else `selective_scan_recompute`."""
    if HAS_MAMBA_SSM and u.is_cuda:
        return _mamba_scan_fn(
            u.contiguous(), delta.contiguous(), A.float(), B.contiguous(), C.contiguous(),
            None if D is None else D.float(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state,
        )  # fmt: skip
    return selective_scan_recompute(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
