"""BMTAS: Bruggemann, Kanakis, Georgoulis & Van Gool, "Automated Search for Resource-Efficient Branched
Multi-Task Networks", BMVC 2020 (reference code: github.com/brdav/bmtas).

Supergraph: every backbone stage exists once per task (one copy per task, all from the same
backbone weights).  Per stage, a T×T matrix of logits α_k: row i is task i's distribution over the
T copies of stage k.  Task i's features at stage k are Σ_j w_ij · copy_j(x_i), w_i a soft
Gumbel-softmax sample of α_k[i].  The resource loss is the expected FLOPs (GFLOPs, as the reference
code's look-up table) of the sampled tree: per stage, task i picks copy argmax and the effective
partition of the tasks is the common refinement with the previous stage's; its distribution is
propagated exactly through the stages (the reference code keeps only the sampled partitions that
the previous stage already allows, and lumps the rest into the all-separate one).

Defaults of the reference code (main_search.py, src/tools.py): Adam for the weights (lr 1e-3,
weight decay 1e-4) and the architecture (lr 1e-2, weight decay 5e-5), λ = 0.05, 80 % / 20 % split
of the training set for weights / architecture, warm-up = epochs // 20 (here at least 1) with each task on its own
copy, temperature 5.0 → 0.1 linearly, architecture optimizer state reset every epoch and the weight
optimizer's after every architecture phase.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.decoders.branched import BranchedDecoder
from mtvision.search.flops import FlopsTable, spec_flops
from mtvision.search.supernet import gumbel_softmax, task_outputs

MAX_TASKS = 7  # the exact resource loss enumerates T^T copy assignments per stage

DEFAULTS = {
    "temperature_initial": 5.0,
    "temperature_final": 0.1,
    "weight_lr": 1e-3,
    "weight_decay": 1e-4,
    "arch_lr": 1e-2,
    "arch_weight_decay": 5e-5,
    "resource_weight": 0.05,
    "arch_fraction": 0.2,
}


def warmup_epochs(epochs: int) -> int:
    """The reference code's warm-up, epochs // 20, but at least one epoch when there are two or more:
    without a warm-up every task's copies start identical, the mixing weights do not change the task
    losses, and only the resource loss moves the architecture (measured: a 10-epoch search with no
    warm-up collapsed to the all-shared tree; benchmarks/RESULTS.md, branching search)."""
    return max(epochs // 20, 1 if epochs >= 2 else 0)


# ------------------------------------------------------------------------------------------- partitions
def _canonical(labels: Sequence[Any]) -> tuple[int, ...]:
    """Group labels renumbered by first appearance (a restricted growth string)."""
    seen: dict[Any, int] = {}
    return tuple(seen.setdefault(x, len(seen)) for x in labels)


class Partitions:
    """All partitions of T tasks, the map from copy assignments to partitions, and their meets."""

    def __init__(self, num_tasks: int) -> None:
        if not 1 <= num_tasks <= MAX_TASKS:
            raise MTVisionError(f"BMTAS's exact resource loss supports 1 to {MAX_TASKS} tasks, got {num_tasks}")
        t = num_tasks
        assignments = list(itertools.product(range(t), repeat=t))
        index: dict[tuple[int, ...], int] = {}
        for a in assignments:
            index.setdefault(_canonical(a), len(index))
        self.items = list(index)
        self.assignments = torch.tensor(assignments, dtype=torch.long)  # (T^T, T)
        self.of_assignment = torch.tensor([index[_canonical(a)] for a in assignments], dtype=torch.long)
        n = len(self.items)
        self.meet = torch.tensor(
            [[index[_canonical(list(zip(p, q)))] for q in self.items] for p in self.items], dtype=torch.long
        )  # meet[p, q]: the common refinement
        self.sizes = torch.tensor([max(p) + 1 for p in self.items], dtype=torch.float64)
        self.together = torch.tensor(
            [[[float(p[i] == p[j]) for j in range(t)] for i in range(t)] for p in self.items], dtype=torch.float64
        )  # (P, T, T)
        self.num = n

    def sampled(self, probs: Tensor) -> Tensor:
        """Distribution over partitions when task i picks copy j with probability probs[i, j]."""
        t = probs.shape[0]
        a = self.assignments.to(probs.device)
        rows = torch.arange(t, device=probs.device).expand_as(a)
        weight = probs[rows, a].prod(dim=1)
        return probs.new_zeros(self.num).index_add(0, self.of_assignment.to(probs.device), weight)

    def propagate(self, sampled: Tensor, previous: Tensor | None) -> Tensor:
        """Distribution of the effective partition: the meet of this stage's sample and the previous."""
        if previous is None:
            return sampled
        joint = (sampled[:, None] * previous[None, :]).reshape(-1)
        return sampled.new_zeros(self.num).index_add(0, self.meet.to(sampled.device).reshape(-1), joint)


def stage_distributions(probs: Sequence[Tensor], parts: Partitions) -> list[Tensor]:
    """Per stage, the distribution over the effective partition of the tasks."""
    out: list[Tensor] = []
    previous = None
    for p in probs:
        previous = parts.propagate(parts.sampled(p), previous)
        out.append(previous)
    return out


def expected_copies(probs: Sequence[Tensor], parts: Partitions | None = None) -> Tensor:
    """Expected number of copies per stage of the sampled tree (probs[k][i, j]: task i on copy j)."""
    parts = parts or Partitions(probs[0].shape[0])
    dists = stage_distributions(probs, parts)
    sizes = parts.sizes.to(device=probs[0].device, dtype=probs[0].dtype)
    return torch.stack([(d * sizes).sum() for d in dists])


def expected_flops(probs: Sequence[Tensor], table: FlopsTable, parts: Partitions | None = None) -> Tensor:
    """Expected FLOPs of the sampled tree: Σ_k E[copies_k] · stage FLOPs + the heads (constant)."""
    copies = expected_copies(probs, parts)
    stages = torch.tensor(table.stages, dtype=copies.dtype, device=copies.device)
    return (copies * stages).sum() + float(sum(table.heads.values()))


# ------------------------------------------------------------------------------------------- network
class BMTASNet(nn.Module):
    """The supergraph's weights: task i's stage-k input is Σ_j w[k][i, j] · copy_j(previous);
    `weights=None` runs each task on its own copies (the warm-up)."""

    def __init__(self, decoder: BranchedDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.tasks = list(decoder.tasks)

    def forward(self, images: Tensor, weights: Sequence[Tensor] | None) -> dict[str, Tensor]:
        branches = self.decoder.branches
        xs = [images] * len(self.tasks)
        feats: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        for k in range(len(branches)):
            cache: dict[tuple[int, int], Tensor] = {}  # stage 0: every task reads the same images
            new = []
            for i in range(len(self.tasks)):
                if weights is None:
                    new.append(branches[k][i](xs[i]))
                    continue
                out = None
                for j in range(len(self.tasks)):
                    key = (id(xs[i]), j)
                    if key not in cache:
                        cache[key] = branches[k][j](xs[i])
                    term = weights[k][i, j] * cache[key]
                    out = term if out is None else out + term
                new.append(out)
            xs = new
            for i, t in enumerate(self.tasks):
                feats[t].append(xs[i])
        return task_outputs(self.decoder, feats, images.shape[-2:])


class BMTAS:
    """The BMTAS search: a `BMTASNet`, per-stage T×T logits, and the resource loss."""

    name = "bmtas"
    joint = False  # bilevel: the architecture steps on held-out data

    def __init__(self, decoder: BranchedDecoder) -> None:
        self.net = BMTASNet(decoder)
        self.tasks = list(decoder.tasks)
        self.backbone = decoder.spec.backbone
        t, k = len(self.tasks), decoder.spec.num_stages
        ref = next(decoder.parameters())
        self.arch = nn.ParameterList(nn.Parameter(torch.zeros(t, t, device=ref.device)) for _ in range(k))
        self.parts = Partitions(t)

    def probabilities(self) -> list[Tensor]:
        """softmax(α_k) per stage (row i: task i's distribution over the copies)."""
        return [torch.softmax(a, dim=-1) for a in self.arch]

    def mixing(self, temperature: float, warmup: bool, generator: torch.Generator, grad: bool) -> list[Tensor] | None:
        """Soft Gumbel-softmax samples of every stage's rows (None during warm-up: own copies)."""
        if warmup:
            return None
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = [gumbel_softmax(a, temperature, hard=False, generator=generator) for a in self.arch]
        return out if grad else [w.detach() for w in out]

    def resource_loss(self, table: FlopsTable) -> Tensor:
        """Expected FLOPs of the sampled tree in GFLOPs (the reference code's unit)."""
        return expected_flops(self.probabilities(), table, self.parts) / 1e9

    def sharing(self) -> list[Tensor]:
        """Per stage, P(tasks i and j share stage k's copy) in the sampled tree (T×T)."""
        with torch.no_grad():
            dists = stage_distributions([p.double() for p in self.probabilities()], self.parts)
            together = self.parts.together.to(dists[0].device)
            return [torch.einsum("p,pij->ij", d, together).float().cpu() for d in dists]

    def derive(self) -> BranchingSpec:
        """The argmax tree: task i takes copy argmax α_k[i] at stage k, refined by the previous stage."""
        labels: list[list[Any]] = []
        previous: list[Any] = [()] * len(self.tasks)
        for a in self.arch:
            choice = a.detach().argmax(dim=-1).tolist()
            previous = [(p, c) for p, c in zip(previous, choice)]
            labels.append(previous)
        return BranchingSpec.from_labels(self.tasks, labels, self.backbone).canonical()

    def expected_flops(self, table: FlopsTable) -> dict[str, Any]:
        """Exact expected FLOPs of the sampled tree, expected copies per stage, and the derived tree's FLOPs."""
        with torch.no_grad():
            probs = [p.double() for p in self.probabilities()]
            copies = expected_copies(probs, self.parts)
            flops = expected_flops(probs, table, self.parts)
        return {
            "expected_flops": float(flops),
            "expected_copies": [float(c) for c in copies],
            "derived_flops": spec_flops(self.derive(), table),
            "estimate": "exact",
        }
