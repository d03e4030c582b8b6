"""Task Adaptive Parameter Sharing (TAPS; Wallingford et al., CVPR 2022).

Every Conv2d / Linear layer l of a shared network gets, per task t, a weight delta ΔW_{t,l}
(initialised to zero) and a scalar score s_{t,l}.  Task t's network uses

    W_{t,l} = W_l + I(s_{t,l} ≥ τ) · ΔW_{t,l}

where the indicator's gradient is passed straight through (∂I/∂s := 1), so that
∂L/∂s_{t,l} = <∂L/∂W_{t,l}, ΔW_{t,l}>.  A sparsity penalty λ · (1/L) Σ_l |s_{t,l}| per task pulls
the scores below τ, so each task keeps only the deltas of the layers it needs.  Defaults follow the
authors' code (github.com/MattWallingford/TAPS, models/taps_net.py, train_sequential.py): τ = 0.1,
scores initialised to 0.15 (every gate open at the start, with zero deltas), the penalty averaged
over layers, and the pretrained W frozen.

`make_task_adaptive(module, tasks)` converts a network in place; `active_task(module, t)` selects
whose weights run (None: the shared network W); `sparsity_penalty`, `adapted_layers`, and
`merge_task` (a plain copy of the network with task t's effective weights) complete the method.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

THRESHOLD = 0.1
SCORE_INIT = 0.15
PENALTY_NORMALISATIONS = ("layers", "params")
ADAPTABLE = (nn.Conv2d, nn.Linear)


class _StraightThroughGate(torch.autograd.Function):
    """I(s ≥ τ) forward; the incoming gradient unchanged backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, score: Tensor, threshold: float) -> Tensor:  # type: ignore[override]
        return (score >= threshold).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def gate(score: Tensor, threshold: float = THRESHOLD) -> Tensor:
    """The hard gate I(score ≥ threshold) (0 or 1) with a straight-through gradient to `score`."""
    return _StraightThroughGate.apply(score, threshold)


class TaskAdaptiveLayer(nn.Module):
    """A Conv2d / Linear layer with per-task gated weight deltas.

    `base` is the original layer (its W and bias are shared by all tasks); `deltas[t]` and
    `scores[t]` are task t's ΔW and score.  Which weights run is set by `task` (None = the shared W).
    Attributes the wrapper lacks (`out_channels`, `kernel_size`, ...) are read from `base`.
    """

    def __init__(
        self,
        base: nn.Module,
        tasks: Sequence[str],
        *,
        name: str = "",
        threshold: float = THRESHOLD,
        score_init: float = SCORE_INIT,
        freeze_shared: bool = True,
    ):
        super().__init__()
        if not isinstance(base, ADAPTABLE):
            raise TypeError(f"TAPS adapts Conv2d and Linear layers, not {type(base).__name__}")
        self.base = base
        self.layer_name = name
        self.threshold = float(threshold)
        weight = base.weight
        # (name, parameter) pairs keep the task order (a plain dict would be sorted by ParameterDict)
        self.deltas = nn.ParameterDict([(t, nn.Parameter(torch.zeros_like(weight))) for t in tasks])
        self.scores = nn.ParameterDict(
            [
                (t, nn.Parameter(torch.full((), float(score_init), dtype=weight.dtype, device=weight.device)))
                for t in tasks
            ]
        )
        if freeze_shared:
            for p in base.parameters():
                p.requires_grad_(False)
        self.task: str | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    @property
    def num_weights(self) -> int:
        """Entries of W (= of each task's ΔW)."""
        return self.base.weight.numel()

    def is_open(self, task: str) -> bool:
        """Whether task's gate is open (its delta is in use)."""
        return bool(self.scores[task].detach() >= self.threshold)

    def task_weight(self, task: str | None) -> Tensor:
        """The weight task `task` runs: W + I(s_t ≥ τ)·ΔW_t (W itself for None)."""
        if task is None:
            return self.base.weight
        score = self.scores[task]
        if not torch.is_grad_enabled() and bool(score < self.threshold):
            return self.base.weight  # closed and nothing to differentiate: the same value, cheaper
        return self.base.weight + gate(score, self.threshold) * self.deltas[task]

    def forward(self, x: Tensor) -> Tensor:
        if self.task is None:
            return self.base(x)
        if self.task not in self.scores:
            raise KeyError(
                f"TAPS layer {self.layer_name!r} has no task {self.task!r} (tasks: {', '.join(self.scores)})"
            )
        weight, base = self.task_weight(self.task), self.base
        if type(base) is nn.Conv2d:
            return base._conv_forward(x, weight, base.bias)
        if type(base) is nn.Linear:
            return F.linear(x, weight, base.bias)
        return functional_call(base, {"weight": weight}, (x,))  # subclasses (same-padding, standardised convs)


def make_task_adaptive(
    module: nn.Module,
    tasks: Sequence[str],
    *,
    threshold: float = THRESHOLD,
    score_init: float = SCORE_INIT,
    freeze_shared: bool = True,
) -> list[str]:
    """Replace, in place, every Conv2d / Linear inside `module` by a `TaskAdaptiveLayer`; the layer names.

    A layer reachable by several paths gets one wrapper.  Layers inside nn.MultiheadAttention are
    left alone (it reads its projection weights directly instead of calling the layers).
    """
    if not tasks:
        raise ValueError("TAPS needs at least one task")
    made: dict[int, TaskAdaptiveLayer] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None or isinstance(child, (TaskAdaptiveLayer, nn.MultiheadAttention)):
                continue
            if isinstance(child, ADAPTABLE):
                if id(child) not in made:
                    made[id(child)] = TaskAdaptiveLayer(
                        child,
                        tasks,
                        name=prefix + key,
                        threshold=threshold,
                        score_init=score_init,
                        freeze_shared=freeze_shared,
                    )
                setattr(parent, key, made[id(child)])
            else:
                visit(child, f"{prefix}{key}.")

    visit(module, "")
    if not made:
        raise ValueError(f"{type(module).__name__} has no Conv2d or Linear layer to adapt")
    return [m.layer_name for m in made.values()]


def taps_layers(module: nn.Module) -> Iterator[TaskAdaptiveLayer]:
    """The TAPS layers of `module`, in module order."""
    return (m for m in module.modules() if isinstance(m, TaskAdaptiveLayer))


def set_active_task(module: nn.Module, task: str | None) -> None:
    """Make every TAPS layer of `module` run `task`'s weights (None: the shared network)."""
    for layer in taps_layers(module):
        layer.task = task


@contextlib.contextmanager
def active_task(module: nn.Module, task: str | None) -> Iterator[None]:
    """Run `module` as task `task`'s network inside the block (the shared network afterwards)."""
    set_active_task(module, task)
    try:
        yield
    finally:
        set_active_task(module, None)


def sparsity_penalty(
    module: nn.Module, tasks: Sequence[str] | None = None, weight: float = 1.0, normalise: str = "layers"
) -> Tensor:
    """λ Σ_t Σ_l c_l |s_{t,l}|: c_l = 1/L ("layers", the authors' code) or the layer's share of the
    adaptable weights ("params", which penalises an open layer by the parameters it adds)."""
    if normalise not in PENALTY_NORMALISATIONS:
        raise ValueError(f"unknown penalty normalisation {normalise!r} (valid: {', '.join(PENALTY_NORMALISATIONS)})")
    layers = list(taps_layers(module))
    if not layers:
        raise ValueError("the module has no TAPS layers")
    names = list(layers[0].scores) if tasks is None else list(tasks)
    total_weights = sum(m.num_weights for m in layers)
    coef = [1.0 / len(layers) if normalise == "layers" else m.num_weights / total_weights for m in layers]
    terms = [c * m.scores[t].abs() for t in names for c, m in zip(coef, layers)]
    return weight * torch.stack(terms).sum()


def adapted_layers(module: nn.Module, tasks: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Per task, the names of the layers whose gate is open (the layers the task adapted)."""
    layers = list(taps_layers(module))
    names = (list(layers[0].scores) if layers else []) if tasks is None else list(tasks)
    return {t: [m.layer_name for m in layers if m.is_open(t)] for t in names}


def adaptation_stats(module: nn.Module) -> dict[str, dict[str, float]]:
    """Per task: open layers (count and fraction), the task-specific share of the adaptable weights
    (what the task adds to the shared network) and the mean score."""
    layers = list(taps_layers(module))
    if not layers:
        return {}
    total = sum(m.num_weights for m in layers)
    out: dict[str, dict[str, float]] = {}
    for t in layers[0].scores:
        open_ = [m for m in layers if m.is_open(t)]
        out[t] = {
            "open_layers": float(len(open_)),
            "open_fraction": len(open_) / len(layers),
            "param_fraction": sum(m.num_weights for m in open_) / total,
            "mean_score": float(torch.stack([m.scores[t].detach().float() for m in layers]).mean()),
        }
    return out


def merge_task(module: nn.Module, task: str) -> nn.Module:
    """A plain copy of `module` as task `task`'s network: each TAPS layer becomes its original layer
    type with weight W + I(s_t ≥ τ)·ΔW_t (no deltas, no scores, no gates)."""
    merged = copy.deepcopy(module)
    plain: dict[int, nn.Module] = {}

    def visit(parent: nn.Module) -> None:
        for key, child in list(parent._modules.items()):
            if isinstance(child, TaskAdaptiveLayer):
                if task not in child.scores:
                    raise KeyError(f"TAPS layer {child.layer_name!r} has no task {task!r}")
                if id(child) not in plain:
                    layer = child.base
                    with torch.no_grad():
                        layer.weight.copy_(child.task_weight(task))
                    for p in layer.parameters():
                        p.requires_grad_(True)
                    plain[id(child)] = layer
                setattr(parent, key, plain[id(child)])
            elif child is not None:
                visit(child)

    with torch.no_grad():
        visit(merged)
    return merged
