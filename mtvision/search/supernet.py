"""Shared pieces of the differentiable branching searches (Learning to Branch, BMTAS).

- `build_copies`: a `BranchedDecoder` with a separate tree, i.e. one copy of every backbone stage
  per task, every copy initialised from the same backbone weights, plus per-task necks and heads;
  the searches wire the copies together themselves.
- `gumbel_softmax`: Gumbel-softmax sampling (soft, or hard straight-through) with noise from an
  explicit `torch.Generator`, so that every DDP rank draws the same architecture.
- `LinearTemperature` / `InverseSqrtTemperature`: per-epoch temperature schedules.
- `SearchStepper`: the weight step and the architecture step (DDP for weights; averaged
  architecture gradients), used by the runner and by tests.
- `fit_budget`: merge sibling branches, most likely to share first, until a tree meets a budget.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.engine.objective import compute_losses
from mtvision.models.backbones import create_backbone
from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.config import ModelConfig
from mtvision.models.decoders.branched import BranchedDecoder
from mtvision.models.heads import resize_to
from mtvision.models.registry import build_model
from mtvision.optim.gradients import average_gradients
from mtvision.search.flops import FlopsTable, check_budget, spec_flops
from mtvision.tasks import Task


# ------------------------------------------------------------------------------------------- copies
def build_copies(model_cfg: ModelConfig) -> BranchedDecoder:
    """A `BranchedDecoder` holding one copy of each backbone stage per task (`branches[k][t]` is
    task t's copy of stage k, all from the same backbone weights) and per-task necks and heads.

    `model_cfg.decoder_options` may set neck_channels, head_channels and norm; the spec is set here.
    """
    options = {k: v for k, v in model_cfg.decoder_options.items() if k != "spec"}
    b = model_cfg.backbone
    num_stages = create_backbone(b.name, out_indices=b.out_indices, **b.kwargs).num_stages  # no weights: a count
    spec = BranchingSpec.separate(list(model_cfg.tasks), num_stages, b.name)
    cfg = ModelConfig.from_dict(
        {**model_cfg.to_dict(), "decoder": "branched", "decoder_options": {**options, "spec": spec.to_dict()}}
    )
    decoder = build_model(cfg).decoder
    assert isinstance(decoder, BranchedDecoder)
    return decoder


def task_outputs(decoder: BranchedDecoder, feats: Mapping[str, Sequence[Tensor]], size: Sequence[int]) -> dict[str, Tensor]:
    """Each task's neck and head on its multi-scale features, resized to the input `size`."""
    return {t: resize_to(decoder.heads[t](decoder.necks[t](list(f))), size) for t, f in feats.items()}


# ------------------------------------------------------------------------------------------- Gumbel
def sample_gumbel(shape: Sequence[int], generator: torch.Generator | None = None, *, device=None, dtype=None) -> Tensor:
    """Standard Gumbel(0, 1) noise, drawn on the generator's device (CPU by default) then moved."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(tuple(shape), generator=generator, device=gen_device, dtype=torch.float64)
    e = (-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300)  # Exp(1)
    g = -torch.log(e)
    return g.to(device=device, dtype=dtype or torch.float32)


def gumbel_softmax(
    logits: Tensor, temperature: float, *, hard: bool = False, generator: torch.Generator | None = None, dim: int = -1
) -> Tensor:
    """A Gumbel-softmax sample of `logits` (Jang et al. 2017; Maddison et al. 2017).

    Soft: softmax((logits + g) / τ).  Hard: the one-hot of its argmax in the forward pass with the
    soft sample's gradient (straight-through).  The noise comes from `generator` so that processes
    seeded alike draw the same sample.
    """
    if not temperature > 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {temperature}")
    noise = sample_gumbel(logits.shape, generator, device=logits.device, dtype=logits.dtype)
    soft = torch.softmax((logits + noise) / temperature, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


# ------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class LinearTemperature:
    """BMTAS: τ falls linearly from `initial` (first epoch after warm-up) to `final` (last epoch);
    τ = `initial` during warm-up.  Reference code (brdav/bmtas, src/tools.py): 5.0 → 0.1."""

    initial: float
    final: float
    epochs: int
    warmup: int = 0

    def __call__(self, epoch: int) -> float:
        span = self.epochs - self.warmup - 1
        if epoch < self.warmup or span <= 0:
            return self.initial
        frac = min(max((epoch - self.warmup) / span, 0.0), 1.0)
        return self.initial - frac * (self.initial - self.final)


@dataclass(frozen=True)
class InverseSqrtTemperature:
    """Learning to Branch as LibMTL implements it (LibMTL/architecture/LTB.py): τ = initial / √(epoch + 1),
    with initial = epochs / 20 there."""

    initial: float

    def __call__(self, epoch: int) -> float:
        return self.initial / math.sqrt(epoch + 1)


# ------------------------------------------------------------------------------------------- methods
class SearchMethod(Protocol):
    """What the runner needs from a search method."""

    name: str
    tasks: list[str]
    net: nn.Module  # the weights: forward(images, mixing) -> {task: output at input size}
    arch: nn.ParameterList  # the architecture parameters
    joint: bool  # True: architecture and weights step together on the training data (LTB)

    def mixing(self, temperature: float, warmup: bool, generator: torch.Generator, grad: bool) -> list[Tensor] | None: ...
    def sharing(self) -> list[Tensor]: ...
    def derive(self) -> BranchingSpec: ...
    def resource_loss(self, table: FlopsTable) -> Tensor | None: ...
    def expected_flops(self, table: FlopsTable) -> dict[str, Any]: ...


@dataclass
class StepResult:
    """Per-task losses of a step (floats) and the resource term (None when not used)."""

    losses: dict[str, float]
    resource: float | None = None


class SearchStepper:
    """Weight steps and architecture steps of a search, single process or DDP.

    The weights run through DistributedDataParallel (when a process group exists); architecture
    gradients are averaged across ranks, and the Gumbel noise comes from one generator seeded alike
    on every rank, so every rank samples and keeps the same architecture.
    """

    def __init__(
        self,
        method: SearchMethod,
        tasks: Mapping[str, Task],
        *,
        weight_lr: float,
        weight_decay: float,
        arch_lr: float,
        arch_weight_decay: float,
        loss_weights: Mapping[str, float] | None = None,
        resource_weight: float = 0.0,
        table: FlopsTable | None = None,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.method, self.tasks = method, dict(tasks)
        self.loss_weights = dict(loss_weights or {})
        self.resource_weight, self.table = resource_weight, table
        self.net: nn.Module = method.net
        if dist.world_size() > 1:
            ids = [device.index] if device is not None and device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(method.net, device_ids=ids)
        self.weight_optimizer = torch.optim.Adam(method.net.parameters(), lr=weight_lr, weight_decay=weight_decay)
        self.arch_optimizer = torch.optim.Adam(method.arch.parameters(), lr=arch_lr, weight_decay=arch_weight_decay)
        self.generator = torch.Generator().manual_seed(10_007 + seed)  # the same on every rank

    def _loss(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        losses = compute_losses(outputs, targets, self.tasks)
        total = sum(self.loss_weights.get(t, 1.0) * v for t, v in losses.items())
        return total, {t: float(v.detach()) for t, v in losses.items()}

    def weight_step(self, images: Tensor, targets: Mapping[str, Tensor], temperature: float, warmup: bool) -> StepResult:
        """One step of the weights (and, for joint methods after warm-up, of the architecture)."""
        joint = self.method.joint and not warmup
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.arch_optimizer.zero_grad(set_to_none=True)
        mixing = self.method.mixing(temperature, warmup, self.generator, grad=joint)
        total, losses = self._loss(self.net(images, mixing), targets)
        total.backward()
        self.weight_optimizer.step()
        if joint:
            average_gradients(list(self.method.arch.parameters()))
            self.arch_optimizer.step()
        return StepResult(losses)

    def arch_step(self, images: Tensor, targets: Mapping[str, Tensor], temperature: float) -> StepResult:
        """One architecture step on held-out data: task losses + λ · resource loss; weights untouched."""
        self.arch_optimizer.zero_grad(set_to_none=True)
        sync = self.net.no_sync() if isinstance(self.net, nn.parallel.DistributedDataParallel) else nullcontext()
        with sync:
            mixing = self.method.mixing(temperature, False, self.generator, grad=True)
            total, losses = self._loss(self.net(images, mixing), targets)
            resource = None
            if self.resource_weight > 0 and self.table is not None:
                term = self.method.resource_loss(self.table)
                if term is not None:
                    total = total + self.resource_weight * term
                    resource = float(term.detach())
            total.backward()
        average_gradients(list(self.method.arch.parameters()))
        self.arch_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)  # the weights' gradients of this step are discarded
        return StepResult(losses, resource)

    def reset_arch_optimizer(self) -> None:
        """Forget the architecture optimizer's moments (BMTAS does so at every epoch)."""
        self.arch_optimizer.state = defaultdict(dict)

    def reset_weight_optimizer(self) -> None:
        """Forget the weight optimizer's moments (BMTAS does so after each architecture phase)."""
        self.weight_optimizer.state = defaultdict(dict)


# ------------------------------------------------------------------------------------------- budget
def fit_budget(spec: BranchingSpec, sharing: Sequence[Tensor], table: FlopsTable, budget: float) -> BranchingSpec:
    """`spec`, or the spec with sibling branches merged until its FLOPs are within `budget`.

    Raises BudgetError when the budget is below the cheapest tree.  Each round merges, among pairs
    of groups at one stage with the same parent, the pair whose tasks are most likely to share that
    stage (mean of `sharing[k][i, j]` over their tasks; ties: the larger FLOPs saving, then the
    earlier stage).  Merging siblings keeps a tree, and all-shared is reached at the latest.
    """
    check_budget(budget, table, spec.tasks)
    order = {t: i for i, t in enumerate(spec.tasks)}
    while spec_flops(spec, table) > budget:
        best: tuple[float, float, int] | None = None
        choice: tuple[int, int, int] | None = None
        for k, part in enumerate(spec.stages):
            for a in range(len(part)):
                for b in range(a + 1, len(part)):
                    if k > 0 and spec.parent(k, a) != spec.parent(k, b):
                        continue
                    s = sharing[k]
                    score = float(sum(s[order[x], order[y]] for x in part[a] for y in part[b])) / (len(part[a]) * len(part[b]))
                    key = (score, float(table.stages[k]), -k)
                    if best is None or key > best:
                        best, choice = key, (k, a, b)
        assert choice is not None  # some stage has two groups while above the cheapest tree
        k, a, b = choice
        part = spec.stages[k]
        merged = tuple(g for i, g in enumerate(part) if i not in (a, b)) + (part[a] + part[b],)
        spec = BranchingSpec(spec.tasks, spec.stages[:k] + (merged,) + spec.stages[k + 1 :], spec.backbone).canonical()
    return spec
