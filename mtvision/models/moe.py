"""A sparsely-gated mixture-of-experts layer with task-conditioned routing.

`MoE(dim, hidden, num_experts, top_k)` replaces a transformer MLP: E experts (Linear-GELU-Linear,
stored as stacked (E, d, h) / (E, h, d) weights), the noisy top-k gate of Shazeer et al. (ICLR 2017)

    H(x) = x·W_g + N(0, 1)·(softplus(x·W_noise) + noise_eps)    (noise in training only)
    G(x) = softmax(KeepTopK(H(x), k))

and their load-balancing loss w·(cv²(Importance) + cv²(Load)), with Importance_e = Σ_x G(x)_e and
the smooth Load_e = Σ_x Φ((x·W_g)_e − kth_excluding(H(x), k, e)) / std_e) (the probability that
expert e stays in the top k when only its own noise is redrawn).  Without noise (or with k = E)
the load is the hard count of tokens routed to each expert.

Routing is task-conditioned for multi-task models: `routing="per_task"` keeps one gate per task
(M3ViT's multi-gate MoE), `routing="task_embedding"` feeds one shared gate with the token
concatenated with a learned task embedding (M3ViT's task-conditioned MoE), `routing="shared"` is the
plain single gate.

Dispatch is batched: the (token, expert) assignments are sorted by expert (stable argsort, so
earlier top-k ranks and earlier tokens win a place), their position inside the expert decides
whether they fit the expert's capacity, kept tokens are gathered into an (E, capacity, d) buffer,
the experts run as two batched matmuls, and the outputs are scattered back weighted by their gate
values.  Assignments beyond capacity are dropped (their contribution is zero, so a residual
connection carries the token) and counted in `last_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import MTVisionError, unknown_name

ROUTINGS = ("shared", "per_task", "task_embedding")


class MoEError(MTVisionError, ValueError):
    """A mixture-of-experts layer cannot be built or called as asked."""


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(x)/mean(x)² (population variance, as in Shazeer et al.'s
    reference code); 0 for fewer than two values."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean**2 + eps)


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """P(expert e is among the top k of H(x) when only e's noise is redrawn), per token and expert.

    `clean`, `noisy`, `noise_std`: N x E logits x·W_g, H(x) and the noise scale.  The threshold that
    e must beat is the k-th largest noisy logit among the *other* experts: the (k+1)-th largest
    overall when e is currently in the top k, the k-th largest otherwise.
    """
    top = noisy.topk(k + 1, dim=-1).values
    threshold_in, threshold_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = noisy > threshold_in
    threshold = torch.where(is_in, threshold_in, threshold_out)
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    return normal.cdf((clean - threshold) / noise_std)


@dataclass
class MoEStats:
    """Routing of one call: assignments per expert before (`load`) and after (`kept`) capacity,
    summed gate values per expert (`importance`), dropped assignments and the capacity used."""

    tokens: int
    capacity: int
    load: Tensor
    kept: Tensor
    importance: Tensor
    dropped: int


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
    ):
        super().__init__()
        if num_experts < 1 or top_k < 1:
            raise MoEError(f"num_experts and top_k must be >= 1, got {num_experts} and {top_k}")
        if top_k > num_experts:
            raise MoEError(f"top_k={top_k} is larger than num_experts={num_experts}")
        if routing not in ROUTINGS:
            raise unknown_name("MoE routing", routing, ROUTINGS)
        self.tasks = list(dict.fromkeys(tasks or []))
        if routing != "shared" and not self.tasks:
            raise MoEError(f"routing={routing!r} needs the task names (tasks=...)")
        if capacity_factor is not None and capacity_factor <= 0:
            raise MoEError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.dim, self.hidden = dim, hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.routing, self.noisy_gating = routing, noisy_gating
        self.capacity_factor, self.balance_weight, self.noise_eps = capacity_factor, balance_weight, noise_eps

        # nn.Linear layout (out x in) per expert: bmm against the transposed view is the fast CPU path
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

        gate_in = dim + (task_embed_dim if routing == "task_embedding" else 0)
        names = self.tasks if routing == "per_task" else ["shared"]
        # Shazeer et al. initialise W_g and W_noise to zero: no signal, some noise
        self.gate_weight = nn.ParameterDict({n: nn.Parameter(torch.zeros(gate_in, num_experts)) for n in names})
        self.noise_weight = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(gate_in, num_experts)) for n in names} if noisy_gating else {}
        )
        self.task_embedding = (
            nn.Parameter(torch.randn(len(self.tasks), task_embed_dim)) if routing == "task_embedding" else None
        )
        rows = self._rows()
        self.register_buffer("usage", torch.zeros(len(rows), num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_total", torch.zeros(len(rows), dtype=torch.long), persistent=False)
        self.last_stats: MoEStats | None = None
        self._aux: list[Tensor] = []

    # ------------------------------------------------------------------ public
    def forward(self, x: Tensor, task: str | Sequence[str] | None = None) -> Tensor:
        """Tokens ... x d -> ... x d.  `task` names the routing task; a sequence of T tasks splits the
        leading dimension of `x` into T equal chunks, chunk i routed for task i (one dispatch for all)."""
        if x.shape[-1] != self.dim:
            raise MoEError(f"expected tokens of width {self.dim}, got shape {tuple(x.shape)}")
        shape = x.shape
        chunk_tasks = [task] if task is None or isinstance(task, str) else list(task)
        if not chunk_tasks or shape[0] % len(chunk_tasks):
            raise MoEError(f"{len(chunk_tasks)} tasks cannot split a leading dimension of {shape[0]}")
        flat = x.reshape(-1, self.dim)
        chunks = flat.chunk(len(chunk_tasks)) if len(chunk_tasks) > 1 else (flat,)
        indices, gates = [], []
        for t, xc in zip(chunk_tasks, chunks):
            idx, g = self._route(xc, t)
            indices.append(idx)
            gates.append(g)
        out = self._dispatch(flat, torch.cat(indices), torch.cat(gates), chunk_tasks, [c.shape[0] for c in chunks])
        return out.reshape(shape)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e applied densely to tokens x (reference path, for checks and tests)."""
        return F.linear(F.gelu(F.linear(x, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])

    def capacity(self, tokens: int) -> int | None:
        """Slots per expert for a call with `tokens` tokens (None: unlimited)."""
        if self.capacity_factor is None or math.isinf(self.capacity_factor):
            return None
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

    def pop_aux_loss(self) -> Tensor | None:
        """The balancing losses of the calls since the last pop, summed (None when there were none)."""
        aux, self._aux = self._aux, []
        return torch.stack(aux).sum() if aux else None

    def reset_stats(self) -> None:
        """Zero the accumulated expert-usage counts."""
        self.usage.zero_()
        self.dropped_total.zero_()

    def expert_usage(self) -> dict[str, Tensor]:
        """Accumulated (token, expert) assignments (before capacity) per task (and "all" for task-less
        calls of a shared gate), each an E-vector of counts."""
        return {r: self.usage[i].clone() for i, r in enumerate(self._rows())}

    def dropped_usage(self) -> dict[str, int]:
        """Accumulated dropped (token, expert) assignments per task (or "all")."""
        return {r: int(self.dropped_total[i]) for i, r in enumerate(self._rows())}

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
        """Clean logits x·W_g (N x E, float32) and the noise scale (None when no noise applies: gating
        is not noisy, or the layer is in eval mode)."""
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
        return clean, std

    def _route(self, x: Tensor, task: str | None) -> tuple[Tensor, Tensor]:
        row = self._task_index(task)
        clean, std = self.gate_logits(x, task)
        noisy_now = std is not None
        logits = clean + torch.randn_like(clean) * std if noisy_now else clean
        top_values, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_values, dim=-1)
        if self.training and self.balance_weight > 0 and x.shape[0] > 0:
            full = torch.zeros_like(logits).scatter(1, idx, gates)
            importance = full.sum(0)
            if noisy_now and self.top_k < self.num_experts:
                load = prob_in_top_k(clean, logits, std, self.top_k).sum(0)
            else:
                load = (full > 0).float().sum(0)
            self._aux.append(self.balance_weight * (cv_squared(importance) + cv_squared(load)))
        with torch.no_grad():
            self.usage[row] += torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        return idx, gates

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, x: Tensor, idx: Tensor, gates: Tensor, tasks: list, sizes: list[int]) -> Tensor:
        n, d = x.shape
        k, num_e = self.top_k, self.num_experts
        flat_expert = idx.t().reshape(-1)  # rank-major: every token's first choice precedes any second choice
        flat_token = torch.arange(n, device=x.device).repeat(k)
        flat_gate = gates.t().reshape(-1)
        counts = torch.bincount(flat_expert, minlength=num_e)
        order = torch.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(n * k, device=x.device) - starts[sorted_expert]
        cap = self.capacity(n)
        if cap is None:
            cap = max(int(counts.max()) if n else 0, 1)
        keep = position < cap
        chosen = order[keep]
        slot = sorted_expert[keep] * cap + position[keep]
        # slot -> token (empty slots read, and write to, a padding row n) and slot -> gate value
        slot_token = torch.full((num_e * cap,), n, dtype=torch.long, device=x.device).index_put_(
            (slot,), flat_token[chosen]
        )
        slot_gate = flat_gate.new_zeros(num_e * cap).index_put((slot,), flat_gate[chosen])
        padded = torch.cat([x, x.new_zeros(1, d)])
        buffer = padded.index_select(0, slot_token).view(num_e, cap, d)
        w1, w2 = self.w1, self.w2
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            buffer, w1, w2 = buffer.to(dtype), w1.to(dtype), w2.to(dtype)
        hidden = F.gelu(torch.bmm(buffer, w1.transpose(1, 2)).add_(self.b1.unsqueeze(1)))
        y = torch.bmm(hidden, w2.transpose(1, 2)).add_(self.b2.unsqueeze(1))
        scale = slot_gate.view(num_e, cap, 1).to(y.dtype)
        y = y * scale if torch.is_grad_enabled() and (y.requires_grad or scale.requires_grad) else y.mul_(scale)
        out = x.new_zeros(n + 1, d).index_add_(0, slot_token, y.view(num_e * cap, d).to(x.dtype))[:n]
        self._record(flat_gate, flat_expert, flat_token, keep, order, counts, cap, tasks, sizes)
        return out

    @torch.no_grad()
    def _record(self, flat_gate, flat_expert, flat_token, keep, order, counts, cap, tasks, sizes) -> None:
        num_e = self.num_experts
        kept_mask = torch.zeros_like(keep)
        kept_mask[order] = keep
        kept = torch.bincount(flat_expert[kept_mask], minlength=num_e)
        importance = torch.zeros(num_e, device=flat_gate.device).index_add_(0, flat_expert, flat_gate.detach().float())
        dropped = int((~keep).sum())
        self.last_stats = MoEStats(
            tokens=int(sum(sizes)),
            capacity=cap,
            load=counts.detach().cpu(),
            kept=kept.cpu(),
            importance=importance.cpu(),
            dropped=dropped,
        )
        if dropped:
            bounds = torch.tensor([0, *sizes], device=flat_token.device).cumsum(0)
            dropped_tokens = flat_token[~kept_mask]
            for i, t in enumerate(tasks):
                in_chunk = ((dropped_tokens >= bounds[i]) & (dropped_tokens < bounds[i + 1])).sum()
                self.dropped_total[self._task_index(t)] += in_chunk
