"""Learning to Branch: Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020.

A tree-structured supernet: every backbone stage k has T blocks (copies of the stage, all from the
same backbone weights).  Block i of stage k ≥ 1 takes its input from one parent among the T blocks
of stage k-1, and each task's neck and head from one block of the last stage; every such choice is
a hard, straight-through Gumbel-softmax sample of its own logits (T×T per layer), so the forward
pass runs a tree while the logits get gradients.  Weights and logits are trained together on the
training data.  The derived tree follows each task's argmax parents from its head to the image.

Sources, kept apart because the paper's method section could not be read here:
- the paper (abstract and quoted passages): branching as Gumbel-softmax sampling, one hard parent
  per child in the forward pass, a search followed by training the tree found, Adam;
- LibMTL's implementation (LibMTL/architecture/LTB.py): T blocks per stage from the same weights,
  τ = (epochs/20) / √(epoch + 1), a warm-up of ⌈epochs/100⌉ epochs, logits stepped together with the
  weights on the training data at the weights' learning rate;
- ours: the task-head gate (LibMTL wires task t to block t, so tasks never share the last stage),
  the warm-up averaging the parents (LibMTL sums them), a separate Adam for the logits without
  weight decay (LibMTL's single Adam also decays them), the argmax derivation, and `fit_budget`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.decoders.branched import BranchedDecoder
from mtvision.search.flops import FlopsTable, spec_flops
from mtvision.search.supernet import gumbel_softmax, task_outputs

DEFAULTS = {"arch_weight_decay": 0.0}  # the weights' lr and decay: SearchOptions (config.py)


def warmup_epochs(epochs: int) -> int:
    """LibMTL's warm-up: epochs with epoch < epochs / 100."""
    return math.ceil(epochs / 100)


def initial_temperature(epochs: int) -> float:
    """LibMTL's τ0 = epochs / 20."""
    return epochs / 20


class LTBNet(nn.Module):
    """The supernet's weights.  `gates[k-1]` (k = 1..K-1) is T×T: row i weighs stage k-1's blocks as
    the input of stage k's block i; `gates[K-1]` is T×T: row t weighs the last stage's blocks as task
    t's (a head gate that LibMTL does not have).  A task's multi-scale features follow its path back
    through the gates."""

    def __init__(self, decoder: BranchedDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.tasks = list(decoder.tasks)

    def forward(self, images: Tensor, gates: Sequence[Tensor]) -> dict[str, Tensor]:
        branches = self.decoder.branches
        blocks = [torch.stack([copy(images) for copy in branches[0]])]
        for k in range(1, len(branches)):
            inputs = torch.einsum("ij,j...->i...", gates[k - 1], blocks[-1])
            blocks.append(torch.stack([branches[k][i](inputs[i]) for i in range(len(branches[k]))]))
        path = gates[-1]  # (task, block of the current stage)
        feats: list[Tensor] = [None] * len(blocks)  # type: ignore[list-item]
        for k in range(len(blocks) - 1, -1, -1):
            feats[k] = torch.einsum("tj,j...->t...", path, blocks[k])
            if k > 0:
                path = path @ gates[k - 1]
        per_task = {t: [f[i] for f in feats] for i, t in enumerate(self.tasks)}
        return task_outputs(self.decoder, per_task, images.shape[-2:])


class LearningToBranch:
    """The Learning-to-Branch search: an `LTBNet` and its parent logits (zeros: uniform at start)."""

    name = "ltb"
    joint = True  # logits and weights step together on the training data

    def __init__(self, decoder: BranchedDecoder) -> None:
        self.net = LTBNet(decoder)
        self.tasks = list(decoder.tasks)
        self.backbone = decoder.spec.backbone
        t, k = len(self.tasks), decoder.spec.num_stages
        ref = next(decoder.parameters())
        self.arch = nn.ParameterList(nn.Parameter(torch.zeros(t, t, device=ref.device)) for _ in range(k))

    def probabilities(self) -> list[Tensor]:
        """softmax of every layer's logits (rows: children or tasks; columns: parents)."""
        return [torch.softmax(a, dim=-1) for a in self.arch]

    def mixing(self, temperature: float, warmup: bool, generator: torch.Generator, grad: bool) -> list[Tensor]:
        """Hard straight-through Gumbel-softmax parent choices (uniform averages during warm-up)."""
        if warmup:
            return [torch.full_like(a, 1.0 / a.shape[-1]).detach() for a in self.arch]
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = [gumbel_softmax(a, temperature, hard=True, generator=generator) for a in self.arch]
        return out if grad else [g.detach() for g in out]

    def resource_loss(self, table: FlopsTable) -> None:
        """Learning to Branch has no resource loss (a FLOPs budget applies when the tree is derived)."""
        return None

    def sharing(self) -> list[Tensor]:
        """Per stage, P(tasks a and b run through the same block), from the parent probabilities:
        the joint distribution of the two paths is propagated from the heads to the image."""
        with torch.no_grad():
            probs = [p.double().cpu() for p in self.probabilities()]
            t = len(self.tasks)
            out: list[Tensor] = [None] * len(probs)  # type: ignore[list-item]
            joints = {}
            for a in range(t):
                for b in range(t):
                    joints[a, b] = torch.outer(probs[-1][a], probs[-1][b])  # blocks of a and b at the last stage
            for k in range(len(probs) - 1, -1, -1):
                share = torch.zeros(t, t, dtype=torch.float64)
                for (a, b), q in joints.items():
                    share[a, b] = 1.0 if a == b else float(torch.trace(q))
                out[k] = share.float()
                if k > 0:
                    g = probs[k - 1]
                    for key, q in joints.items():
                        same = torch.diagonal(q)
                        off = q - torch.diag(same)
                        joints[key] = g.T @ off @ g + torch.diag(same @ g)
            return out

    def derive(self) -> BranchingSpec:
        """The argmax tree: each task's block at every stage along its argmax parents."""
        choice = [a.detach().argmax(dim=-1).tolist() for a in self.arch]
        path = list(choice[-1])  # block of the last stage per task
        labels = [path]
        for k in range(len(choice) - 1, 0, -1):
            path = [choice[k - 1][b] for b in path]
            labels.append(path)
        labels.reverse()
        return BranchingSpec.from_labels(self.tasks, labels, self.backbone).canonical()

    def expected_flops(self, table: FlopsTable, samples: int = 4000, seed: int = 0) -> dict[str, Any]:
        """Monte-Carlo expected FLOPs of the sampled tree (parents drawn from the softmax), expected
        copies per stage, and the derived tree's FLOPs."""
        gen = torch.Generator().manual_seed(seed)
        probs = [p.detach().double().cpu() for p in self.probabilities()]
        t = len(self.tasks)
        draws = [torch.multinomial(p, samples, replacement=True, generator=gen) for p in probs]  # (T, S) each
        block = draws[-1]  # (task, sample): block at the last stage
        copies = [0.0] * len(probs)
        for k in range(len(probs) - 1, -1, -1):
            onehot = torch.zeros(t, samples, t).scatter_(2, block.unsqueeze(-1), 1.0)
            copies[k] = float((onehot.sum(0) > 0).sum(-1).double().mean())
            if k > 0:
                block = torch.gather(draws[k - 1], 0, block)  # parent of each task's block
        flops = sum(c * f for c, f in zip(copies, table.stages)) + float(sum(table.heads.values()))
        return {
            "expected_flops": flops,
            "expected_copies": copies,
            "derived_flops": spec_flops(self.derive(), table),
            "estimate": f"monte_carlo ({samples} samples)",
        }
