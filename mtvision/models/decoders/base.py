"""The contract every multi-task decoder implements, and the one typed output all models return.

A decoder is built as `Decoder(make_backbone, tasks, **options)`: `make_backbone()` returns a fresh
`Backbone` (soft-sharing decoders call it once per column) and `tasks` maps task names to their
`Task` records.  `forward(images, tasks)` computes only what the listed tasks need and returns a
`ModelOutput`:

- `predictions`: task -> raw output (logits, depth, unnormalised normals), at any resolution from
  the decoder (the `MultiTaskModel` resizes them to the input size);
- `deep_supervision`: task -> list of intermediate predictions, supervised with the task's own
  loss in training (empty in eval mode);
- `regularizers`: name -> scalar loss that is not a task (`MOE_BALANCE`, `TAPS_SPARSITY`,
  `MMOE_DIVERSITY`), added to the total outside the loss weighting and the gradient calibration;
- `shared`: the shared representation, the tensors every task's loss flows through and that
  separate the shared part from the task parts (features-level calibration and GradNorm take
  per-task gradients here); empty when no such cut exists (soft sharing, prompt tokens);
- `branches`: the branch points, the per-scale tensors where the shared part splits into the
  tensors `shared` is computed from (FULLER calibration); empty when the decoder has none;
- `stats`: name -> detached per-forward statistics (expert loads `experts/<layer>/<task>` as
  E-vectors of counts or gate mass, `.../dropped` counts); the trainer averages them over its
  logging window.

Nothing is kept on modules between calls: everything a caller needs from a forward is in its
output.  `shared` and `branches` are the tensors `graph_boundary` returns, and the decoder reads
only those downstream.  Each is a fresh view, so together they form a cut of the autograd graph:
the gradient with respect to one of them is the part of the loss's gradient that passes through
it (not through a later backbone level computed from the same tensor), and backpropagating the
per-task gradients from all of them gives each parameter its gradient exactly once.  Under
`torch.compile` a graph ends there as well, so the same holds compiled as in eager.

Beyond `forward`, a decoder implements `task_parameters(task)` (what only that task's output
depends on); `shared_parameters()` defaults to everything else, and `state_scalars()` may report
statistics of the decoder's parameters (e.g. TAPS's open layers) for the loggers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtvision.models.backbones import Backbone
from mtvision.tasks import Task

BackboneFactory = Callable[[], Backbone]

MOE_BALANCE = "moe_balance"
"""Regularizer name: a mixture-of-experts load-balancing loss (M3ViT, TaskExpert)."""
TAPS_SPARSITY = "taps_sparsity"
"""Regularizer name: TAPS's sparsity penalty on its gate scores."""
MMOE_DIVERSITY = "mmoe_diversity"
"""Regularizer name: MMoEEx's expert-diversity term."""


class ModelOutput(NamedTuple):
    """What a decoder and a `MultiTaskModel` return (see the module docstring for each field)."""

    predictions: dict[str, Tensor]
    deep_supervision: dict[str, list[Tensor]]
    regularizers: dict[str, Tensor]
    shared: list[Tensor]
    branches: list[Tensor]
    stats: dict[str, Tensor]


def model_output(
    predictions: Mapping[str, Tensor],
    *,
    deep_supervision: Mapping[str, Sequence[Tensor]] | None = None,
    regularizers: Mapping[str, Tensor] | None = None,
    shared: Sequence[Tensor] = (),
    branches: Sequence[Tensor] = (),
    stats: Mapping[str, Tensor] | None = None,
) -> ModelOutput:
    """A `ModelOutput` with fresh containers (empty where not given)."""
    return ModelOutput(
        dict(predictions),
        {t: list(v) for t, v in (deep_supervision or {}).items()},
        dict(regularizers or {}),
        list(shared),
        list(branches),
        dict(stats or {}),
    )


def graph_boundary(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Views of `tensors` for the decoder to read from here on: their gradients are the paths
    through them only; under `torch.compile` the graph ends here, so that they are outputs of one
    compiled graph and inputs of the next."""
    views = [t.view_as(t) for t in tensors]
    if torch.compiler.is_compiling():  # after the views: they are outputs of this graph, inputs of the next
        torch._dynamo.graph_break()
    return views


class MultiTaskDecoder(nn.Module):
    """Backbone(s) plus task-specific parts, mapping images to a `ModelOutput`."""

    def __init__(self, tasks: dict[str, Task]):
        super().__init__()
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.tasks = dict(tasks)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        """The outputs of `tasks` (a subset of `self.tasks`, computing only what they need)."""
        raise NotImplementedError

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only `task`'s output depends on."""
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not task-specific."""
        owned = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return (p for p in self.parameters() if id(p) not in owned)

    def state_scalars(self) -> dict[str, float]:
        """Statistics of the decoder's own parameters for the loggers (none by default)."""
        return {}

    def finish_training(self, images: Iterable[Tensor]) -> str | None:
        """Called once by the trainer with the chosen final weights, before the test split is scored
        and the model is saved; `images` are normalised training batches without augmentation (the
        same on every rank).  Returns a line for the log, or None when the decoder does nothing
        (the default)."""
        return None
