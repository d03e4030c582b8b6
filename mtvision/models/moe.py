"""A sparsely-gated mixture-of-experts layer with task-conditioned routing.

`MoE(dim, hidden, num_experts, top_k)` replaces a transformer MLP: E experts (Linear-GELU-Linear,
stored as stacked (E, d, h) / (E, h, d) weights), the noisy top-k gate of Shazeer et al. (ICLR 2017)

    H(x) = x·W_g + N(0, 1)·(softplus(x·W_noise) + noise_eps)    (noise in training only)
    G(x) = softmax(KeepTopK(H(x), k))

and their load-balancing loss w·(cv²(Importance) + cv²(Load)), with Importance_e = Σ_x G(x)_e and
the smooth Load_e = Σ_x Φ((x·W_g)_e − kth_excluding(H(x), k, e)) / std_e) (the probability that
expert e stays in the top k when only its own noise is redrawn).  Without noise (or with k = E)
the load is the hard count of tokens routed to each expert.

Options reproduce M3ViT's released gate (FastMoE `NoisyGate_VMoE` with `--vmoe_noisy_std 0`):
`gate_values="softmax_top_k"` (softmax over all E logits, then the k largest probabilities kept as
they are, summing to less than 1), `gate_init="kaiming_uniform"` (nn.Linear's init over the
d x E gate: U(+-1/sqrt(E))), `expert_init="kaiming_uniform"` (FastMoE's expert init over each
stacked E x out x in tensor: U(+-1/sqrt(out·in)), zero biases), `fixed_noise_std` (a constant
noise scale instead of the trainable one, in training only; 0 in the release) and
`balance_variance="unbiased"` (torch's default var, N - 1).  With fixed noise the smooth load
uses that constant scale; the release's own smooth load at a non-zero scale compares raw logits
with probability thresholds, which is not reproduced (its released scale is 0: hard counts).

Routing is task-conditioned for multi-task models: `routing="per_task"` keeps one gate per task
(M3ViT's multi-gate MoE), `routing="task_embedding"` feeds one shared gate with the token
concatenated with a learned task embedding (M3ViT's task-conditioned MoE), `routing="shared"` is the
plain single gate.

Dispatch: the (token, expert) assignments are sorted by expert (stable argsort, so earlier top-k
ranks and earlier tokens win a place) and their position inside the expert decides whether they fit
the expert's capacity.  Assignments beyond capacity are dropped (their contribution is zero, so a
residual connection carries the token) and counted in the call's `MoEStats`.  The kept tokens then run
through their experts in one of two forms (`dispatch=`), with the same results up to rounding:

- "grouped": the expert-sorted tokens are split into each expert's exact contiguous slice and each
  expert runs as its own pair of GEMMs (a loop over the E experts, none over tokens).  No padding:
  the fastest form on CPU, where E small GEMMs cost about what one large one does.
- "batched": kept tokens are gathered into an (E, capacity, d) buffer padded to the fullest expert
  (or to the capacity), and the experts run as two batched matmuls: a fixed, small number of kernel
  launches whatever E (kept as the GPU default), at the price of the work on the padding.
- "auto" (default): "grouped" for tokens on the CPU, "batched" elsewhere.

Either way the expert outputs are weighted by their gate values and added into their tokens' rows
with index_add (one per expert in the grouped form, whose (n·k, d) outputs are never materialised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import MTVisionError, unknown_name

ROUTINGS = ("shared", "per_task", "task_embedding")
DISPATCHES = ("auto", "grouped", "batched")
GATE_VALUES = ("top_k_softmax", "softmax_top_k")
"""How gate values are made: a softmax over the k largest logits (Shazeer et al.; they sum to 1) or
a softmax over all experts of which the k largest are kept unchanged (M3ViT's release)."""
GATE_INITS = ("zeros", "kaiming_uniform")
EXPERT_INITS = ("trunc_normal", "kaiming_uniform")
VARIANCES = ("population", "unbiased")


class MoEError(MTVisionError, ValueError):
    """A mixture-of-experts layer cannot be built or called as asked."""


def cv_squared(x: Tensor, eps: float = 1e-10, unbiased: bool = False) -> Tensor:
    """Squared coefficient of variation var(x)/mean(x)² (population variance by default, as in
    Shazeer et al.'s reference code; `unbiased`: divided by n - 1, as torch's `var()` that M3ViT's
    release uses); 0 for fewer than two values."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    mean = x.mean()
    return ((x - mean) ** 2).sum() / (x.numel() - (1 if unbiased else 0)) / (mean**2 + eps)


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int, top: Tensor | None = None) -> Tensor:
    """P(expert e is among the top k of H(x) when only e's noise is redrawn), per token and expert.

    `clean`, `noisy`, `noise_std`: N x E logits x·W_g, H(x) and the noise scale.  The threshold that
    e must beat is the k-th largest noisy logit among the *other* experts: the (k+1)-th largest
    overall when e is currently in the top k, the k-th largest otherwise.  `top`: the k+1 largest
    noisy logits per token (descending), when the caller already has them.
    """
    top = noisy.topk(k + 1, dim=-1).values if top is None else top
    threshold_in, threshold_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = noisy > threshold_in
    threshold = torch.where(is_in, threshold_in, threshold_out)
    return 0.5 * (1 + torch.erf((clean - threshold) / noise_std / math.sqrt(2)))  # standard normal cdf


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`logits.topk(k, dim=-1)`; for k = 1 on the CPU a row-wise max (several times faster) when no
    row has a tie or a NaN at its maximum, where the two could pick different experts."""
    if k == 1 and logits.device.type == "cpu":
        values, idx = logits.max(dim=-1, keepdim=True)
        if bool(((logits == values).sum(-1) == 1).all()):
            return values, idx
    return logits.topk(k, dim=-1)


@dataclass
class MoEStats:
    """Routing of one call: assignments per expert before (`load`) and after (`kept`) capacity,
    summed gate values per expert (`importance`), dropped assignments and the capacity used; per
    routing row (each task, or "all" for task-less calls of a shared gate), the assignments per
    expert before capacity (`usage`) and the dropped assignments (`dropped_by_row`).  Tensors stay
    on the tokens' device (detached)."""

    tokens: int
    capacity: int
    load: Tensor
    kept: Tensor
    importance: Tensor
    dropped: int
    usage: dict[str, Tensor]
    dropped_by_row: dict[str, Tensor]


class MoEOutput(NamedTuple):
    """What one `MoE` call returns: the tokens, the balancing loss of this call (None when it does
    not apply: eval mode, a zero weight, no tokens) and the routing statistics."""

    output: Tensor
    balance_loss: Tensor | None
    stats: MoEStats


class MoE(nn.Module):
    """Top-k mixture of MLP experts with noisy, optionally task-conditioned gating.

    Args:
        dim: token width d (input and output).
        hidden: hidden width h of each expert.
        num_experts: E.
        top_k: experts per token (k <= E).
        tasks: task names the gates know (required by "per_task" and "task_embedding" routing;
            with "shared" routing they only label the usage statistics).
        routing: "shared", "per_task" or "task_embedding".
        noisy_gating: add the trainable Gaussian noise of Shazeer et al. in training.
        capacity_factor: expert capacity = ceil(capacity_factor · tokens · k / E); None: no limit
            (no token is ever dropped, as in M3ViT's FastMoE layers).
        balance_weight: w of the balancing loss w·(cv²(importance) + cv²(load)).
        task_embed_dim: width of the learned task embedding ("task_embedding" routing).
        noise_eps: added to softplus(x·W_noise) (Shazeer et al.'s reference code uses 1e-2).
        dispatch: "auto", "grouped" or "batched" (see the module docstring); same results, speed only.
        gate_values: "top_k_softmax" or "softmax_top_k" (see GATE_VALUES).
        gate_init: "zeros" (Shazeer et al.) or "kaiming_uniform" (nn.Linear's, M3ViT's release).
        expert_init: "trunc_normal" (std 0.02) or "kaiming_uniform" (FastMoE's, M3ViT's release).
        fixed_noise_std: a constant noise scale on the logits in training (needs noisy_gating=False;
            M3ViT's release: --vmoe_noisy_std / E = 0).
        balance_variance: "population" or "unbiased" variance in cv² (M3ViT's release: unbiased).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 16,
        top_k: int = 4,
        *,
        tasks: Sequence[str] | None = None,
        routing: str = "shared",
        noisy_gating: bool = True,
        capacity_factor: float | None = None,
        balance_weight: float = 1e-2,
        task_embed_dim: int = 64,
        noise_eps: float = 1e-2,
        dispatch: str = "auto",
        gate_values: str = "top_k_softmax",
        gate_init: str = "zeros",
        expert_init: str = "trunc_normal",
        fixed_noise_std: float = 0.0,
        balance_variance: str = "population",
    ):
        super().__init__()
        for what, value, valid in (("gate_values", gate_values, GATE_VALUES), ("gate_init", gate_init, GATE_INITS),
                                   ("expert_init", expert_init, EXPERT_INITS), ("balance_variance", balance_variance, VARIANCES)):
            if value not in valid:
                raise unknown_name(f"MoE {what}", value, valid)
        if fixed_noise_std < 0 or (fixed_noise_std > 0 and noisy_gating):
            raise MoEError(f"fixed_noise_std must be >= 0 and needs noisy_gating=False, got {fixed_noise_std}")
        if num_experts < 1 or top_k < 1:
            raise MoEError(f"num_experts and top_k must be >= 1, got {num_experts} and {top_k}")
        if top_k > num_experts:
            raise MoEError(f"top_k={top_k} is larger than num_experts={num_experts}")
        if routing not in ROUTINGS:
            raise unknown_name("MoE routing", routing, ROUTINGS)
        self.tasks = list(dict.fromkeys(tasks or []))
        if routing != "shared" and not self.tasks:
            raise MoEError(f"routing={routing!r} needs the task names (tasks=...)")
        if dispatch not in DISPATCHES:
            raise unknown_name("MoE dispatch", dispatch, DISPATCHES)
        if capacity_factor is not None and capacity_factor <= 0:
            raise MoEError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.dim, self.hidden = dim, hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.routing, self.noisy_gating = routing, noisy_gating
        self.capacity_factor, self.balance_weight, self.noise_eps = capacity_factor, balance_weight, noise_eps
        self.dispatch = dispatch
        self.gate_values, self.fixed_noise_std = gate_values, float(fixed_noise_std)
        self.unbiased_balance = balance_variance == "unbiased"

        # nn.Linear layout (out x in) per expert: bmm against the transposed view, or F.linear on one slice
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        for w in (self.w1, self.w2):
            if expert_init == "kaiming_uniform":  # fan-in of the stacked E x out x in tensor: out * in
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            else:
                nn.init.trunc_normal_(w, std=0.02)

        gate_in = dim + (task_embed_dim if routing == "task_embedding" else 0)
        names = self.tasks if routing == "per_task" else ["shared"]
        # Shazeer et al. initialise W_g and W_noise to zero: no signal, some noise
        self.gate_weight = nn.ParameterDict({n: nn.Parameter(torch.zeros(gate_in, num_experts)) for n in names})
        if gate_init == "kaiming_uniform":  # fan-in of the gate_in x E matrix: E
            for w in self.gate_weight.values():
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.noise_weight = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(gate_in, num_experts)) for n in names} if noisy_gating else {}
        )
        self.task_embedding = (
            nn.Parameter(torch.randn(len(self.tasks), task_embed_dim)) if routing == "task_embedding" else None
        )

    # ------------------------------------------------------------------ public
    def forward(self, x: Tensor, task: str | Sequence[str] | None = None) -> MoEOutput:
        """Tokens ... x d -> `MoEOutput` with ... x d tokens.  `task` names the routing task; a sequence
        of T tasks splits the leading dimension of `x` into T equal chunks, chunk i routed for task i
        (one dispatch for all)."""
        if x.shape[-1] != self.dim:
            raise MoEError(f"expected tokens of width {self.dim}, got shape {tuple(x.shape)}")
        shape = x.shape
        chunk_tasks = [task] if task is None or isinstance(task, str) else list(task)
        if not chunk_tasks or shape[0] % len(chunk_tasks):
            raise MoEError(f"{len(chunk_tasks)} tasks cannot split a leading dimension of {shape[0]}")
        flat = x.reshape(-1, self.dim)
        chunks = flat.chunk(len(chunk_tasks)) if len(chunk_tasks) > 1 else (flat,)
        indices, gates, balance, usage = [], [], [], {}
        for t, xc in zip(chunk_tasks, chunks):
            idx, g, aux = self._route(xc, t)
            indices.append(idx)
            gates.append(g)
            if aux is not None:
                balance.append(aux)
            row = self._rows()[self._task_index(t)]
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
            usage[row] = counts if row not in usage else usage[row] + counts
        idx, gate = (indices[0], gates[0]) if len(chunks) == 1 else (torch.cat(indices), torch.cat(gates))
        out, stats = self._dispatch(flat, idx, gate, chunk_tasks, [c.shape[0] for c in chunks], usage)
        loss = torch.stack(balance).sum() if balance else None
        return MoEOutput(out.reshape(shape), loss, stats)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e applied densely to tokens x (reference path, for checks and tests)."""
        return F.linear(F.gelu(F.linear(x, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])

    def capacity(self, tokens: int) -> int | None:
        """Slots per expert for a call with `tokens` tokens (None: unlimited)."""
        if self.capacity_factor is None or math.isinf(self.capacity_factor):
            return None
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

    def gate_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of `task`'s own gate ("per_task" routing; empty otherwise)."""
        if self.routing != "per_task":
            return []
        self._task_index(task)
        return [self.gate_weight[task]] + ([self.noise_weight[task]] if self.noisy_gating else [])

    # ------------------------------------------------------------------ gating
    def _rows(self) -> list[str]:
        """Row names of the usage statistics: the tasks, plus "all" for task-less calls of a shared gate."""
        return self.tasks + (["all"] if self.routing == "shared" else [])

    def _task_index(self, task: str | None) -> int:
        """Row of `task` in the statistics (and in the task embedding); validates the name."""
        if task is None:
            if self.routing != "shared":
                raise MoEError(f"routing={self.routing!r} needs a task (known: {', '.join(self.tasks)})")
            return len(self.tasks)
        if task not in self.tasks:
            raise unknown_name("task of this MoE gate", task, self.tasks or ["(none: call without a task)"])
        return self.tasks.index(task)

    def gate_logits(self, x: Tensor, task: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Clean logits x·W_g (N x E, float32) and the noise scale (None when no noise applies: no
        noise is configured, or the layer is in eval mode)."""
        index = self._task_index(task)
        key = task if self.routing == "per_task" else "shared"
        with torch.autocast(device_type=x.device.type, enabled=False):
            inp = x.float()
            if self.task_embedding is not None:
                emb = self.task_embedding[index].float().expand(inp.shape[0], -1)
                inp = torch.cat([inp, emb], dim=-1)
            clean = inp @ self.gate_weight[key].float()
            noisy = self.noisy_gating and self.training
            std = F.softplus(inp @ self.noise_weight[key].float()) + self.noise_eps if noisy else None
            if self.fixed_noise_std > 0 and self.training:
                std = clean.new_full(clean.shape, self.fixed_noise_std)
        return clean, std

    def _route(self, x: Tensor, task: str | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(top-k expert indices, their gate values, this chunk's balancing loss or None)."""
        clean, std = self.gate_logits(x, task)
        noisy_now = std is not None
        logits = clean + torch.randn_like(clean) * std if noisy_now else clean
        k = self.top_k
        balance = self.training and self.balance_weight > 0 and x.shape[0] > 0
        smooth_load = balance and noisy_now and k < self.num_experts
        if self.gate_values == "softmax_top_k":  # the k largest of the softmax over all experts, as they are
            probs = torch.softmax(logits, dim=-1)
            gates, idx = probs.topk(min(k + 1, self.num_experts), dim=-1)
            gates = gates[:, :k]
            top_values = logits.gather(1, idx) if smooth_load else None
        else:
            # the smooth load needs the (k+1)-th logit too: one topk serves both (noise makes ties impossible)
            top_values, idx = top_k(logits, k + 1 if smooth_load else k)
            gates = torch.softmax(top_values[:, :k], dim=-1)
        aux = None
        if balance:
            full = torch.zeros_like(logits).scatter(1, idx[:, :k], gates)
            importance = full.sum(0)
            if smooth_load:
                load = prob_in_top_k(clean, logits, std, k, top=top_values).sum(0)
            else:
                load = (full > 0).float().sum(0)
            unbiased = self.unbiased_balance
            aux = self.balance_weight * (cv_squared(importance, unbiased=unbiased) + cv_squared(load, unbiased=unbiased))
        return idx[:, :k], gates, aux

    # ------------------------------------------------------------------ dispatch
    def dispatch_form(self, device: torch.device | str) -> str:
        """The dispatch used for tokens on `device`: `self.dispatch`, with "auto" resolved."""
        if self.dispatch not in DISPATCHES:
            raise unknown_name("MoE dispatch", self.dispatch, DISPATCHES)
        if self.dispatch != "auto":
            return self.dispatch
        return "grouped" if torch.device(device).type == "cpu" else "batched"

    def _dispatch(
        self, x: Tensor, idx: Tensor, gates: Tensor, tasks: list, sizes: list[int], usage: dict[str, Tensor]
    ) -> tuple[Tensor, MoEStats]:
        n, d = x.shape
        num_e = self.num_experts
        form = self.dispatch_form(x.device)
        flat_expert = idx.t().reshape(-1)  # rank-major: every token's first choice precedes any second choice
        flat_gate = gates.t().reshape(-1)
        counts = torch.bincount(flat_expert, minlength=num_e)
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert, in priority order
        limit = self.capacity(n)
        if limit is None:  # room for the fullest expert: nothing overflows
            cap, overflow = max(int(counts.max()) if n else 0, 1), False
        else:  # the check is free on the CPU; elsewhere mask anyway rather than wait for the device
            cap = limit
            overflow = x.device.type != "cpu" or (n > 0 and int(counts.max()) > cap)
        dropped = order[:0]
        if overflow:  # drop each expert's assignments past its capacity
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=x.device)
            position -= starts.repeat_interleave(counts, output_size=order.numel())
            keep = position < cap
            order, dropped = order[keep], order[~keep]
        kept = counts.clamp(max=cap)
        token = order % n if n else order  # assignment i is token i mod n (rank-major)
        gate = flat_gate[order]
        if form == "grouped":
            out = self._grouped(x, token, gate, kept.tolist())
        else:
            out = self._batched(x, token, gate, kept, cap)
        return out, self._stats(flat_gate, flat_expert, counts, kept, cap, dropped % max(n, 1), tasks, sizes, usage)

    def _expert_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens and stacked expert matrices, cast to the autocast dtype when autocast is on."""
        w1, w2 = self.w1, self.w2
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        return x, w1, w2

    def _grouped(self, x: Tensor, token: Tensor, gate: Tensor, kept: list[int]) -> Tensor:
        """Experts on their exact slices of the expert-sorted tokens (no padding), one GEMM pair each,
        each slice's gated output added straight into the result."""
        xs, w1, w2 = self._expert_weights(x.index_select(0, token))
        w1, b1, w2, b2 = w1.unbind(0), self.b1.unbind(0), w2.unbind(0), self.b2.unbind(0)
        out = x.new_zeros(x.shape)
        for e, (xe, te, ge) in enumerate(zip(xs.split(kept), token.split(kept), gate.unsqueeze(1).split(kept))):
            if kept[e]:
                ye = F.linear(F.gelu(F.linear(xe, w1[e], b1[e])), w2[e], b2[e])
                out.index_add_(0, te, (ye * ge.to(ye.dtype)).to(x.dtype))
        return out

    def _batched(self, x: Tensor, token: Tensor, gate: Tensor, kept: Tensor, cap: int) -> Tensor:
        """Experts as two batched matmuls over an (E, cap, d) buffer padded to `cap` slots each."""
        n, d = x.shape
        num_e = self.num_experts
        # slot of each kept assignment: its expert's first slot plus its rank inside the expert
        shift = torch.arange(num_e, device=x.device) * cap - (torch.cumsum(kept, 0) - kept)
        slot = torch.arange(token.numel(), device=x.device) + shift.repeat_interleave(kept, output_size=token.numel())
        # slot -> token (empty slots read, and write to, a padding row n) and slot -> gate value
        slot_token = torch.full((num_e * cap,), n, dtype=torch.long, device=x.device).index_put_((slot,), token)
        slot_gate = gate.new_zeros(num_e * cap).index_put((slot,), gate)
        padded = torch.cat([x, x.new_zeros(1, d)])
        buffer, w1, w2 = self._expert_weights(padded.index_select(0, slot_token).view(num_e, cap, d))
        hidden = F.gelu(torch.bmm(buffer, w1.transpose(1, 2)).add_(self.b1.unsqueeze(1)))
        y = torch.bmm(hidden, w2.transpose(1, 2)).add_(self.b2.unsqueeze(1))
        scale = slot_gate.view(num_e, cap, 1).to(y.dtype)
        y = y * scale if torch.is_grad_enabled() and (y.requires_grad or scale.requires_grad) else y.mul_(scale)
        return x.new_zeros(n + 1, d).index_add_(0, slot_token, y.view(num_e * cap, d).to(x.dtype))[:n]

    @torch.no_grad()
    def _stats(self, flat_gate, flat_expert, counts, kept, cap, dropped_tokens, tasks, sizes, usage) -> MoEStats:
        importance = flat_gate.new_zeros(self.num_experts, dtype=torch.float32)
        importance.index_add_(0, flat_expert, flat_gate.detach().float())
        dropped = dropped_tokens.numel()
        rows = self._rows()
        by_row = {rows[self._task_index(t)]: counts.new_zeros(()) for t in tasks}
        if dropped:
            bounds = torch.tensor([0, *sizes], device=dropped_tokens.device).cumsum(0)
            for i, t in enumerate(tasks):
                row = rows[self._task_index(t)]
                by_row[row] = by_row[row] + ((dropped_tokens >= bounds[i]) & (dropped_tokens < bounds[i + 1])).sum()
        return MoEStats(int(sum(sizes)), cap, counts, kept, importance, dropped, usage, by_row)
