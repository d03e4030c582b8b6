"""Loss weighting: methods that turn per-task losses into the one scalar to backpropagate.

Each method is a `LossWeighting` (an ``nn.Module``) that keeps all of its state in itself: trainable state
(UW's log-variances, GradNorm's weights, FAMO's logits) as parameters, running state (DWA's and IGB's
epoch losses, RLW's generator, FAMO's own Adam) as buffers or extra state. ``state_dict()`` /
``load_state_dict()`` therefore round-trip everything a training checkpoint needs. Move the object to
the training device with ``.to(device)`` before the first step.

Protocol, per optimizer step ``step`` (the same number for every micro-batch of one step):

1. ``total, weights = weighting(losses, step)``; methods with ``needs_shared_grads`` (GradNorm) take
   ``weighting(losses, step, shared=...)``, the parameters (or output tensor) of the last shared layer.
   ``losses`` maps exactly the tasks given at construction to scalar tensors. ``total`` is the scalar to
   backpropagate, regularisers included; ``weights`` holds each task's current weight, for logging.
2. Backpropagate ``total`` and step the optimizer. The trainer adds ``weighting.extra_parameters()`` to
   its optimizer (UW and GradNorm; FAMO steps its own small optimizer and returns none). The papers use
   the model's optimizer for them; several re-implementations (Nash-MTL, IGB code) give UW's
   log-variances lr 0.025. Do not weight-decay them. Under DDP they are outside the model's DDP
   wrapper, so the trainer must all-reduce (average) their gradients before the step.
3. ``weighting.after_step(losses_after)`` after a real optimizer step, ``weighting.after_step(None)``
   after a skipped one. Only FAMO (``needs_losses_after_step``) reads ``losses_after``: the per-task
   losses of the same batch from an extra no-grad forward of the updated model (under gradient
   accumulation, the mean over the same micro-batches). GradNorm renormalises its weights here.
4. ``weighting.end_epoch()`` at the end of every training epoch. DWA and IGB average the finite losses
   that ``forward`` saw in training mode (``weighting.train()``, the default) during the epoch;
   ``end_epoch(averages)`` supplies the averages instead (e.g. all-reduced under DDP, so that every
   rank computes the same weights).

Methods (``WEIGHTINGS``): ew, fixed, uw (Kendall et al. 2018), dwa (Liu et al. 2019), gradnorm
(Chen et al. 2018), rlw (Lin et al. 2022), gls (Chennupati et al. 2019), log (the MTMamba releases'
log losses), famo (Liu et al. 2023), igb (Dai et al. 2023, the heuristic IGB_v1 only), stch (Lin et al.
2024) and go4align (Shen et al. 2024). Each class documents its formula and defaults.

Bad input: losses whose keys differ from the tasks raise `LossWeightingError` naming the missing and
extra tasks. A non-finite loss makes ``total`` non-finite (the trainer skips the step) and changes no
state: nothing is accumulated or recorded, no sample is drawn, no weight moves, and the weights
reported are those of the last finite step. ``make_weighting`` rejects unknown methods and options
with did-you-mean errors.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.errors import MTVisionError, unknown_name

__all__ = [
    "DynamicWeightAverage",
    "EqualWeighting",
    "FAMO",
    "FixedWeighting",
    "GO4Align",
    "GeometricLossStrategy",
    "GradNorm",
    "IGB",
    "LogLossWeighting",
    "LossWeighting",
    "LossWeightingError",
    "RandomLossWeighting",
    "STCH",
    "UncertaintyWeighting",
    "WEIGHTINGS",
    "make_weighting",
]


class LossWeightingError(MTVisionError, ValueError):
    """Bad input to a loss weighting: wrong tasks, bad options, missing shared layer."""


def _check_task_keys(tasks: Sequence[str], given: Iterable[str], what: str) -> None:
    given = list(given)
    missing = [t for t in tasks if t not in given]
    extra = [t for t in given if t not in tasks]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise LossWeightingError(f"{what} must have exactly the tasks {list(tasks)}: {'; '.join(parts)}")


def _task_values(tasks: Sequence[str], values: Mapping[str, float] | None, what: str, default: float) -> list[float]:
    """`values` (a subset of `tasks`, unknown names rejected) as a list in task order."""
    values = dict(values or {})
    unknown = [k for k in values if k not in tasks]
    if unknown:
        raise LossWeightingError(f"{what} names unknown tasks {unknown} (tasks: {list(tasks)})")
    out = [float(values.get(t, default)) for t in tasks]
    if not all(math.isfinite(v) for v in out):
        raise LossWeightingError(f"{what} must be finite, got {values}")
    return out


class LossWeighting(nn.Module):
    """Base class: per-task losses -> (total loss, per-task weights), with the method's state inside.

    Subclasses implement `_combine(vec, step, finite, shared)`, where `vec` holds the losses in task
    order and `finite` says whether all are finite; when it is False they must not change any state.
    """

    name: ClassVar[str] = ""
    needs_shared_grads: ClassVar[bool] = False
    needs_losses_after_step: ClassVar[bool] = False
    constant: ClassVar[bool] = False
    """True for methods whose weights never change (EW, fixed): `forward` then reads no value back
    from the device (no synchronisation), since there is no state to guard and nothing to report."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise LossWeightingError(f"tasks must be a list of task names, not the string {tasks!r}")
        tasks = list(tasks)
        if not tasks:
            raise LossWeightingError("a loss weighting needs at least one task")
        if not all(isinstance(t, str) for t in tasks):
            raise LossWeightingError(f"task names must be strings, got {tasks}")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise LossWeightingError(f"duplicate task names {dup}")
        self.tasks: list[str] = tasks
        self._reported: dict[str, float] | None = None  # weights of the last finite step, for logging

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The losses as a 1-D tensor in task order (autograd kept); checks keys and shapes."""
        _check_task_keys(self.tasks, losses.keys(), "losses")
        for t in self.tasks:
            if not isinstance(losses[t], Tensor) or losses[t].numel() != 1:
                raise LossWeightingError(f"loss of task {t!r} must be a scalar tensor, got {losses[t]!r}")
        return torch.stack([losses[t].reshape(()) for t in self.tasks])

    def forward(
        self, losses: Mapping[str, Tensor], step: int = 0, shared: Tensor | Iterable[Tensor] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """(total loss to backpropagate, current weight of each task)."""
        vec = self.stack(losses)
        if self.constant:
            return self._combine(vec, int(step), True, shared)[0], self.constant_weights()
        finite = bool(torch.isfinite(vec.detach()).all())
        total, weights = self._combine(vec, int(step), finite, shared)
        reported = dict(zip(self.tasks, weights.detach().double().cpu().tolist()))
        if finite:
            self._reported = reported
        elif self._reported is not None:
            reported = dict(self._reported)
        return total, reported

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _combine")

    def constant_weights(self) -> dict[str, float]:
        """The weights of a `constant` method (every task 1.0 unless a subclass says otherwise)."""
        return dict.fromkeys(self.tasks, 1.0)

    def extra_parameters(self) -> list[nn.Parameter]:
        """The method's own trainable parameters, for the trainer's optimizer (none for most methods)."""
        return list(self.parameters())

    def after_step(self, losses_after: Mapping[str, Tensor] | None = None) -> None:
        """Hook after the optimizer step (None: the step was skipped). A no-op unless a method needs it."""

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """Hook at the end of a training epoch. A no-op unless a method needs it."""

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


class EqualWeighting(LossWeighting):
    """Equal weighting (EW): L = Σ_t L_t, every weight 1."""

    name = "ew"
    constant = True

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        return vec.sum(), torch.ones_like(vec.detach())


class FixedWeighting(LossWeighting):
    """Fixed weights: L = Σ_t w_t L_t with `weights[t]` given (tasks not named get 1.0).

    Naming a task that is not in `tasks` is an error that lists the unknown names.
    """

    name = "fixed"
    constant = True

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        self.register_buffer("weights", torch.tensor(_task_values(self.tasks, weights, "weights", 1.0)))

    def constant_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        w = self.weights.to(vec)
        return (w * vec).sum(), w


class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (UW), Kendall, Gal & Cipolla, CVPR 2018.

    With learned s_t = log σ_t² (initial `init_log_var`, default 0, i.e. σ = 1):
    L = Σ_t c_t exp(−s_t) L_t + ½ s_t, where c_t = ½ for regression tasks (the paper's Gaussian
    likelihood, 1/(2σ²) L + log σ) and c_t = 1 for the tasks listed in `classification` (the paper's
    softmax approximation, 1/σ² L + log σ). The default (every task regression, c = ½) is LibMTL's form;
    its optimum is σ_t² = L_t (classification form: σ_t² = 2 L_t). Reported weights are c_t exp(−s_t).
    The log-variances are `extra_parameters()`, trained jointly with the model.
    """

    name = "uw"

    def __init__(self, tasks: Sequence[str], classification: Sequence[str] = (), init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        classification = [classification] if isinstance(classification, str) else list(classification)
        unknown = [t for t in classification if t not in self.tasks]
        if unknown:
            raise LossWeightingError(f"classification names unknown tasks {unknown} (tasks: {self.tasks})")
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))
        factor = [1.0 if t in classification else 0.5 for t in self.tasks]
        self.register_buffer("factor", torch.tensor(factor), persistent=False)

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        s = self.log_vars
        w = self.factor.to(s) * torch.exp(-s)
        return (w * vec + 0.5 * s).sum(), w.detach()


class _EpochLosses(LossWeighting):
    """Accumulates the finite losses seen by forward during an epoch (for DWA and IGB)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("loss_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.int64))

    def _accumulate(self, vec: Tensor, finite: bool) -> None:
        if finite and self.training:
            self.loss_sum += vec.detach().to(self.loss_sum)
            self.loss_count += 1

    def _epoch_average(self, epoch_losses: Mapping[str, float] | None) -> Tensor | None:
        """This epoch's average losses (None when no finite loss was seen); resets the accumulator."""
        if epoch_losses is not None:
            _check_task_keys(self.tasks, epoch_losses.keys(), "epoch_losses")
            avg = torch.tensor([float(epoch_losses[t]) for t in self.tasks], dtype=torch.float64)
            avg = avg.to(self.loss_sum.device)
        elif int(self.loss_count) > 0:
            avg = self.loss_sum / self.loss_count
        else:
            avg = None
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.epochs_done += 1
        if avg is None or not bool(torch.isfinite(avg).all()):
            return None
        return avg


class DynamicWeightAverage(_EpochLosses):
    """Dynamic Weight Average (DWA), Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019.

    L = Σ_t w_t L_t with w_t = T exp(r_t/τ) / Σ_i exp(r_i/τ), r_t = L̄_t(e−1) / L̄_t(e−2), where L̄(e)
    is the average training loss of epoch e and τ = `temperature` (default 2). w = 1 until two epoch
    averages exist (epochs 1 and 2). Forward accumulates the epoch's finite losses; `end_epoch()` turns
    them into the next epoch's weights. An epoch without any finite loss is not recorded.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise LossWeightingError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.zeros(2, self.num_tasks, dtype=torch.float64))
        self.register_buffer("recorded", torch.zeros((), dtype=torch.int64))
        self.register_buffer("weights", torch.ones(self.num_tasks))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        self._accumulate(vec, finite)
        w = self.weights.to(vec)
        return (w * vec).sum(), w

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """Record the epoch's average losses and set the weights for the next epoch."""
        avg = self._epoch_average(epoch_losses)
        if avg is None:
            return
        self.history[0] = self.history[1]
        self.history[1] = avg
        self.recorded += 1
        if int(self.recorded) >= 2:
            ratio = self.history[1] / self.history[0]
            self.weights.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, dim=0))


class GradNorm(LossWeighting):
    """GradNorm, Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018.

    The network minimises Σ_i w_i L_i. The weights w (initially 1) minimise
    L_grad = Σ_i |G_i − Ḡ · r_i^α|, with G_i = ‖∇_W w_i L_i‖₂ over the last shared layer W (`shared`),
    Ḡ = mean_i G_i, r_i = L̃_i / mean_j L̃_j, L̃_i = L_i / L_i(0) (L(0): the first finite losses seen) and
    α = `alpha` (default 1.5); the target Ḡ·r_i^α is a constant. After each optimizer step that
    followed a finite forward (`after_step`) w is renormalised to Σ w_i = T (clamped at 0 first: the paper
    leaves negative weights undefined). The norms are those of this process's batch (no DDP reduction).

    `total` = Σ_i sg(w_i) L_i + L_grad, where sg stops the gradient: the network gets the gradient of
    the weighted loss and w only ∇_w L_grad, as in the paper. Since G_i = |w_i| ‖∇_W L_i‖, the norms
    ‖∇_W L_i‖ are computed once (no second-order graph is needed; ∂L_grad/∂w_i is exactly what the
    paper's create_graph gives). The paper gives w no separate learning rate: put `extra_parameters()`
    in the model's optimizer.
    """

    name = "gradnorm"
    needs_shared_grads = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.ones(self.num_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        w = self.weights
        weighted = (w.detach().to(vec) * vec).sum()
        if not finite:
            return weighted, w.detach()
        params = _shared_tensors(shared)
        if not vec.requires_grad:
            raise LossWeightingError("GradNorm needs losses that require grad (call it inside the training graph)")
        norms = []
        for i in range(self.num_tasks):
            grads = torch.autograd.grad(vec[i], params, retain_graph=True, allow_unused=True)
            sq = [g.detach().double().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64))
        norms_t = torch.stack(norms).to(w)
        if not bool(torch.isfinite(norms_t).all()):
            return weighted + torch.tensor(float("nan"), device=vec.device), w.detach()
        base = self.initial_losses.to(vec) if bool(self.has_initial) else vec.detach()
        ratio = vec.detach() / base
        r = (ratio / ratio.mean()).to(w)
        grad_norms = w.abs() * norms_t  # ‖∇_W w_i L_i‖ = |w_i| ‖∇_W L_i‖
        target = (grad_norms.mean() * r.pow(self.alpha)).detach()
        l_grad = (grad_norms - target).abs().sum()
        if not bool(self.has_initial):
            self.initial_losses.copy_(vec.detach())
            self.has_initial.fill_(True)
        self.pending.fill_(True)
        return weighted + l_grad.to(weighted), w.detach()

    @torch.no_grad()
    def after_step(self, losses_after: Mapping[str, Tensor] | None = None) -> None:
        """Renormalise the weights to sum to the number of tasks (after a finite forward only)."""
        w = self.weights
        if not bool(self.pending) or not bool(torch.isfinite(w).all()):
            return
        self.pending.fill_(False)
        w.clamp_(min=0.0)
        s = w.sum()
        if float(s) > 0:
            w.mul_(self.num_tasks / s)
        else:
            w.fill_(1.0)


def _shared_tensors(shared: Tensor | Iterable[Tensor] | None) -> list[Tensor]:
    if shared is None:
        raise LossWeightingError("GradNorm needs shared=: the parameters (or output) of the last shared layer")
    params = [shared] if isinstance(shared, Tensor) else list(shared)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise LossWeightingError("shared= must be tensors that require grad (the last shared layer's parameters)")
    return params


class RandomLossWeighting(LossWeighting):
    """Random loss weighting (RLW), Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
    Weighting", TMLR 2022.

    L = Σ_t λ_t L_t with λ = softmax(ε), ε ~ N(0, I_T), drawn afresh for every optimizer step (`step`;
    micro-batches of one step share the draw) from a generator seeded with `seed` (default 0) that
    lives in this object, so the draws resume exactly from a checkpoint (and the same seed gives every
    DDP rank the same weights). The weights sum to 1, as in the paper and LibMTL (some re-implementations
    scale them by T).
    """

    name = "rlw"

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks))
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("drawn", torch.zeros((), dtype=torch.bool))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        if finite and (not bool(self.drawn) or step != int(self.last_step)):
            eps = torch.randn(self.num_tasks, generator=self.generator)
            self.weights.copy_(torch.softmax(eps, dim=0))
            self.last_step.fill_(step)
            self.drawn.fill_(True)
        w = self.weights.to(vec)
        return (w * vec).sum(), w

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())


class GeometricLossStrategy(LossWeighting):
    """Geometric loss strategy (GLS), Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019.

    L = (Π_t L_t)^{1/T}, computed as exp(mean_t log L_t). The reported weights are the gradient's
    effective weights ∂L/∂L_t = L / (T L_t). Losses must be positive (a zero loss gives L = 0 and an
    undefined gradient).
    """

    name = "gls"

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        total = torch.exp(torch.log(vec).mean())
        return total, (total / (self.num_tasks * vec)).detach()


class LogLossWeighting(LossWeighting):
    """Log losses, the `log` loss scheme of the MTMamba releases: L = Σ_t w_t log(L_t + ε), fixed
    `weights` w_t (tasks not named get 1.0; the releases use 1 for every task) and ε = 1e-8.

    The model gradient is Σ_t w_t ∇L_t / (L_t + ε): each task counts by its relative change. The
    reported weights are these effective weights w_t / (L_t + ε). `optim.loss_weights` multiply L_t
    inside the log and so leave the gradient unchanged: use `weights`. Each micro-batch's losses go
    through the log, as the release does per GPU (one image per GPU, DDP averaging the gradients
    of 8 GPUs): one image per micro-batch on 8 processes (or 8 accumulated micro-batches) gives the
    release's gradient; a batch of 8 in one micro-batch takes the log of its mean loss instead.
    Losses must be > -ε.
    """

    name = "log"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None, eps: float = 1e-8) -> None:
        super().__init__(tasks)
        if not eps >= 0:
            raise LossWeightingError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.register_buffer("weights", torch.tensor(_task_values(self.tasks, weights, "weights", 1.0)))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        w = self.weights.to(vec)
        shifted = vec + self.eps
        return (w * torch.log(shifted)).sum(), (w / shifted).detach()


class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (FAMO), Liu, Liu, Stone & Liu, NeurIPS 2023.

    Logits ξ (initially 0), z = softmax(ξ). With D_t = L_t − L_t* + ε (L*: `min_losses`, default 0;
    ε = 1e-8 as in the official code) the model minimises
        total = Σ_t (z_t / c) log D_t,   c = Σ_t z_t / D_t  (z and c held constant),
    so the model's gradient is Σ_t w_t ∇L_t with reported weights w_t = z_t / (c D_t) (they sum to 1).
    After the model step, `after_step(losses_after)` takes the same batch's losses from a no-grad
    forward of the updated model, Δ_t = log D_t(before) − log D_t(after), and steps ξ along
    δ = ∇_ξ zᵀΔ = z ⊙ (Δ − zᵀΔ) with this object's own Adam (lr `w_lr` = 0.025, weight decay
    `gamma` = 1e-3, i.e. ξ ← Adam(δ + γξ)). The official code's `famo.py` defaults to γ = 0.01 and
    tunes γ per benchmark; 1e-3 is kept here. ξ is a parameter (checkpointed), but `extra_parameters()`
    is empty: the model optimizer must not touch it. The paper also clips the shared gradient norm to 1:
    that is the trainer's `grad_clip`.
    """

    name = "famo"
    needs_losses_after_step = True

    def __init__(
        self,
        tasks: Sequence[str],
        gamma: float = 1e-3,
        w_lr: float = 0.025,
        min_losses: Mapping[str, float] | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        if not w_lr > 0 or not gamma >= 0:
            raise LossWeightingError(f"FAMO needs w_lr > 0 and gamma >= 0, got w_lr={w_lr}, gamma={gamma}")
        self.gamma, self.w_lr, self.eps = float(gamma), float(w_lr), float(eps)
        self.logits = nn.Parameter(torch.zeros(self.num_tasks))
        self.register_buffer("min_losses", torch.tensor(_task_values(self.tasks, min_losses, "min_losses", 0.0)))
        self.register_buffer("pending_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.int64))
        self.optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)

    def extra_parameters(self) -> list[nn.Parameter]:
        """None: FAMO steps its logits with its own optimizer."""
        return []

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        z = torch.softmax(self.logits.detach(), dim=0).to(vec)
        d = vec - self.min_losses.to(vec) + self.eps
        c = (z / d.detach()).sum()
        total = (z / c * torch.log(d)).sum()
        weights = z / (c * d.detach())
        if finite:
            self.pending_sum += vec.detach().to(self.pending_sum)
            self.pending_count += 1
        return total, weights

    def after_step(self, losses_after: Mapping[str, Tensor] | None = None) -> None:
        """Update ξ from the change in log losses over the model step (None: discard, no update)."""
        count = int(self.pending_count)
        before = self.pending_sum / max(count, 1)
        self.pending_sum.zero_()
        self.pending_count.zero_()
        if losses_after is None or count == 0:
            return
        after = self.stack(losses_after).detach().to(before)
        if not bool(torch.isfinite(after).all()):
            return
        m = self.min_losses.to(before)
        delta = torch.log(before - m + self.eps) - torch.log(after - m + self.eps)
        with torch.enable_grad():
            z = torch.softmax(self.logits, dim=0)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta.to(z))
        self.optimizer.zero_grad(set_to_none=True)
        self.logits.grad = grad
        self.optimizer.step()
        self.logits.grad = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(dict(state["optimizer"])))


class IGB(_EpochLosses):
    """Improvable Gap Balancing, heuristic version IGB_v1 (Dai, Fei & Lu, "Improvable Gap Balancing for
    Multi-Task Learning", UAI 2023).

    Base losses L_t^base are the average training losses of epoch `base_epoch` (default 1, the first
    epoch; the official script's `--base_epoch 1` counts from 0, i.e. takes the second; if that epoch
    saw no finite loss, the next epoch that did is used). From then on each step's weights are
    w = T · softmax(g / τ) with the improvable gap g_t = L_t / L_t^base of the current losses (the ideal
    loss taken as 0) and τ = `temperature` (default 1, as in the official code): tasks farther from
    their goal get more weight. Before the base losses exist, w = 1. As in the paper and the official
    code, IGB is applied to scale-invariant (log) losses: total = Σ_t w_t log L_t (`log_losses=False`
    gives Σ_t w_t L_t), so losses must be positive. The paper's second variant, IGB_v2 (weights from a
    SAC reinforcement-learning agent), is not implemented.
    """

    name = "igb"

    def __init__(
        self, tasks: Sequence[str], temperature: float = 1.0, base_epoch: int = 1, log_losses: bool = True
    ) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise LossWeightingError(f"temperature must be > 0, got {temperature}")
        if int(base_epoch) < 1:
            raise LossWeightingError(f"base_epoch counts from 1, got {base_epoch}")
        self.temperature, self.base_epoch, self.log_losses = float(temperature), int(base_epoch), bool(log_losses)
        self.register_buffer("base_losses", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("has_base", torch.zeros((), dtype=torch.bool))
        self.register_buffer("weights", torch.ones(self.num_tasks))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        terms = torch.log(vec) if self.log_losses else vec
        if finite and bool(self.has_base):
            gap = vec.detach().double() / self.base_losses
            self.weights.copy_(self.num_tasks * torch.softmax(gap / self.temperature, dim=0))
        if not bool(self.has_base):
            self._accumulate(vec, finite)
        w = self.weights.to(vec)
        return (w * terms).sum(), w

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """At the end of epoch `base_epoch`, fix the base losses to that epoch's averages."""
        if bool(self.has_base):
            self.epochs_done += 1
            return
        avg = self._epoch_average(epoch_losses)
        if int(self.epochs_done) >= self.base_epoch and avg is not None:
            self.base_losses.copy_(avg)
            self.has_base.fill_(True)


def _global_losses(vec: Tensor) -> Tensor:
    """The detached losses averaged over the DDP ranks (each rank's loss is its share of the global
    batch's, so the mean is the global batch's loss); unchanged in one process.  Every rank must call
    it at the same point (the objective calls the weighting once per micro-batch on every rank)."""
    values = vec.detach().double().clone()
    if dist.world_size() > 1:
        dist.all_reduce_mean_(values)
    return values


def _linearised(value: Tensor, coef: Tensor, vec: Tensor) -> Tensor:
    """`value` with the gradient Σ_t coef_t ∇L_t (coefficients computed from the global losses)."""
    return value.to(vec.dtype) + (coef.to(vec) * (vec - vec.detach())).sum()


class STCH(_EpochLosses):
    """Smooth Tchebycheff scalarisation (STCH; Lin, Zhang, Yang, Zhang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024), in the form of the authors' MTL code
    (Xi-L/STCH, STCH_MTL; also LibMTL's `STCH`).

    Warm-up: during epochs 1..`warmup_epoch` (the release's epochs 0..warmup_epoch−1) the total is
    Σ_t log(L_t + ε); the next epoch uses the same total and averages its losses into the reference
    point z_t (the release's "nadir vector": the losses the scalarisation is normalised by).  Then
        total = T μ log Σ_t exp(ℓ_t / μ),   ℓ_t = log(L_t / z_t + ε),
    the smooth maximum of the normalised log losses (gradient weights T softmax(ℓ/μ)_t / (L_t + ε z_t):
    the worst task leads; as μ → 0 the total tends to T max_t ℓ_t, the Tchebycheff scalarisation).
    μ = 1 and warmup_epoch = 4 are the defaults of the release and LibMTL, ε = 1e-20.  If the
    averaging epoch saw no finite loss, the next epoch that does is used.

    The weights come from the losses averaged over the DDP ranks (one small all-reduce per
    micro-batch), so every rank weights alike and DDP equals one process on the whole batch; the
    total has the STCH value and the gradient Σ_t c_t ∇L_t with those weights c_t (reported).
    Losses must be positive.
    """

    name = "stch"

    def __init__(self, tasks: Sequence[str], mu: float = 1.0, warmup_epoch: int = 4, eps: float = 1e-20) -> None:
        super().__init__(tasks)
        if not (math.isfinite(mu) and mu > 0):
            raise LossWeightingError(f"STCH mu must be > 0, got {mu}")
        if int(warmup_epoch) != warmup_epoch or warmup_epoch < 0:
            raise LossWeightingError(f"STCH warmup_epoch must be an integer >= 0, got {warmup_epoch}")
        if not eps >= 0:
            raise LossWeightingError(f"eps must be >= 0, got {eps}")
        self.mu, self.warmup_epoch, self.eps = float(mu), int(warmup_epoch), float(eps)
        self.register_buffer("reference", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("has_reference", torch.zeros((), dtype=torch.bool))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        losses = _global_losses(vec)
        finite = finite and bool(torch.isfinite(losses).all())
        if not bool(self.has_reference):
            if int(self.epochs_done) >= self.warmup_epoch:
                self._accumulate(losses, finite)
            value = torch.log(losses + self.eps).sum()
            coef = 1.0 / (losses + self.eps)
        else:
            z = self.reference
            scaled = torch.log(losses / z + self.eps) / self.mu
            value = self.num_tasks * self.mu * torch.logsumexp(scaled, dim=0)
            coef = self.num_tasks * torch.softmax(scaled, dim=0) / (losses + self.eps * z)
        return _linearised(value, coef, vec), coef.to(vec.dtype)

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """At the end of the averaging epoch, fix the reference point to its average losses."""
        if bool(self.has_reference):
            self.epochs_done += 1
            return
        avg = self._epoch_average(epoch_losses)
        if int(self.epochs_done) > self.warmup_epoch and avg is not None:
            self.reference.copy_(avg)
            self.has_reference.fill_(True)


def group_means(values: Tensor, num_groups: int) -> Tensor:
    """Each value replaced by the mean of its group, in the optimal 1-D k-means partition of `values`
    into `num_groups` groups (contiguous in sorted order; exact, by dynamic programming over the
    sorted values; ties are broken towards the earlier split)."""
    t = values.numel()
    k = min(int(num_groups), t)
    if k <= 1:
        return values.mean().expand(t).clone()
    if k == t:
        return values.clone()
    order = torch.argsort(values, stable=True)
    v = values[order].double().tolist()
    prefix, prefix_sq = [0.0], [0.0]
    for x in v:
        prefix.append(prefix[-1] + x)
        prefix_sq.append(prefix_sq[-1] + x * x)

    def sse(i: int, j: int) -> float:  # within-group squared error of v[i:j]
        s = prefix[j] - prefix[i]
        return prefix_sq[j] - prefix_sq[i] - s * s / (j - i)

    inf = float("inf")
    cost = [[inf] * (t + 1) for _ in range(k + 1)]
    split = [[0] * (t + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, t + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + sse(i, j)
                if c < cost[g][j] - 1e-15 * max(1.0, abs(c)):
                    cost[g][j], split[g][j] = c, i
    out = [0.0] * t
    j = t
    for g in range(k, 0, -1):
        i = split[g][j]
        mean = (prefix[j] - prefix[i]) / (j - i)
        for pos in range(i, j):
            out[pos] = mean
        j = i
    result = torch.empty(t, dtype=torch.float64)
    result[order] = torch.tensor(out, dtype=torch.float64)
    return result.to(values)


class GO4Align(LossWeighting):
    """GO4Align (Shen, Wang, Xiao, van Noord & Worring, "GO4Align: Group Optimization for Multi-Task
    Alignment", NeurIPS 2024), as the official code (autumn9999/GO4Align, `GO4ALIGN`) computes it.

    Risk-guided group indicators, each step: the risk probabilities p (starting at 1/T) become
    p_t ← p_t exp(−η L_t), normalised to sum 1 (η = `robust_step_size` = 1e-4); each task's
    indicator is γ_t = p_t · Σ_i L_i / L_t (a task whose loss is small next to the others' gets a
    large indicator).  Dynamical group assignment: the indicators are clustered into `num_groups`
    groups by k-means (exact 1-D k-means here, `group_means`; the release calls a k-means package)
    and every task of a group gets its group's mean indicator as its weight: total = Σ_t w_t L_t
    (w held constant).  num_groups = 1 is the release's default (one group: every task gets the
    mean indicator); more groups than tasks give each task its own indicator.

    The indicators come from the losses averaged over the DDP ranks (one small all-reduce per
    micro-batch), so every rank weights alike; each call (micro-batch) moves p once, as one step of
    the release.  Losses must be positive (a zero loss makes the step non-finite: it is skipped).
    """

    name = "go4align"

    def __init__(self, tasks: Sequence[str], num_groups: int = 1, robust_step_size: float = 1e-4) -> None:
        super().__init__(tasks)
        if int(num_groups) != num_groups or num_groups < 1:
            raise LossWeightingError(f"GO4Align num_groups must be an integer >= 1, got {num_groups}")
        if not (math.isfinite(robust_step_size) and robust_step_size >= 0):
            raise LossWeightingError(f"robust_step_size must be a finite number >= 0, got {robust_step_size}")
        self.num_groups, self.robust_step_size = int(num_groups), float(robust_step_size)
        self.register_buffer("probs", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def _combine(self, vec: Tensor, step: int, finite: bool, shared: Any) -> tuple[Tensor, Tensor]:
        losses = _global_losses(vec)
        finite = finite and bool(torch.isfinite(losses).all())
        probs = self.probs * torch.exp(-self.robust_step_size * losses)
        probs = probs / probs.sum()
        if finite:
            self.probs.copy_(probs)
        indicators = probs * losses.sum() / losses
        weights = group_means(indicators, self.num_groups).to(vec.dtype)
        return (weights * vec).sum(), weights


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    cls.name: cls
    for cls in (
        EqualWeighting,
        FixedWeighting,
        UncertaintyWeighting,
        DynamicWeightAverage,
        GradNorm,
        RandomLossWeighting,
        GeometricLossStrategy,
        LogLossWeighting,
        FAMO,
        IGB,
        STCH,
        GO4Align,
    )
}


def make_weighting(name: str, tasks: Sequence[str], **options: Any) -> LossWeighting:
    """The loss weighting `name` (a key of WEIGHTINGS) for `tasks`; unknown names and options are
    errors that suggest the closest valid one."""
    if name not in WEIGHTINGS:
        raise unknown_name("loss weighting", name, WEIGHTINGS)
    cls = WEIGHTINGS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    for key in options:
        if key not in valid:
            raise unknown_name(f"option of loss weighting {name!r}", key, valid)
    return cls(tasks, **options)

