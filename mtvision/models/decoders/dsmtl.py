"""DSMTL, Deep Safe Multi-Task Learning (Yue, Ye, Zhang, Liang, Tsang; arXiv 2111.10601).

Every task t owns a private encoder next to the public encoder all tasks share, and a learned gate
mixes the two representations for t's private decoder:

    r_t = alpha_t * R_public + (1 - alpha_t) * R_t,    alpha_t = sigmoid(a_t) in [0, 1],

with a_t = logit(gate_init) (0.5 by default: an even mix, as the authors' release starts its gate).
An encoder here is a backbone plus HPS's FPN neck (`mtvision/models/heads.py`) and a private decoder
is HPS's task head, so a gate fixed at 0 (private) is exactly the single-task HPS model of the
task and a gate fixed at 1 (public) is exactly HPS.

Learning strategies (`strategy`):

- "joint" (DSMTL-JL): one objective, the sum of the task losses on the gated predictions, over every
  parameter; the public encoder learns from each task through its gate.
- "individual" (DSMTL-IL): the public encoder learns the multi-task objective of HPS through its own
  per-task heads (emitted as deep supervision, so the task's own loss trains them), while each task's
  gated prediction reads the public representation as a fixed input (no gradient): task t's private
  encoder, gate and decoder minimise L_t alone.  For any public encoder, alpha_t = 0 is the
  single-task model, so each task's own optimum is never worse than its single-task one.  (The
  authors' release has no individual-learning code; this is mtvision's reading of the strategy.)

The scalable extension (DSMTL-AL, "compact") learns which backbone stages need a private copy:

- `search: true` gives every task a private copy of every stage and a binary choice per (task,
  stage) between its copy and the public stage output, z_t^s = c * E_t^s(z_t^(s-1)) + (1 - c) * P^s,
  with c drawn by a straight-through hard Gumbel-softmax over (1 - p, p), p = sigmoid(b_ts), at
  temperature `search_tau` (the form of the authors' release's lite gate, tau 0.1, p = 0.5 at start,
  which there picks public or private once per task for the whole encoder; per stage is mtvision's
  extension); in eval mode c is [p >= 0.5] and unchosen copies are not run.
- `private_stages: {task: [stage, ...]}` builds only those copies (the compact architecture);
  `derive_private_stages` reads the choice off a searched model and `compact_model` prunes it to
  that architecture with the same weights (identical eval outputs).

Each task's private neck always exists (the task stream ends in it); the representation gate stays.
Options `search` and `private_stages` cut the backbone into stages (`backbone_stages`: timm CNNs,
Swin, EfficientNet); the full model runs any timm backbone whole.

Private encoders (backbone, neck) and decoders (head) can start from single-task runs of the same
config: `private_init: {task: folder}` names `mtv-train` pretrained folders (config.json +
model.safetensors) of HPS models with that task; a tensor whose shape does not fit is a
CheckpointError that names it and both shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import CheckpointError, unknown_name
from mtvision.models.backbones import Backbone
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.decoders.branched import backbone_stages, run_stages
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task

STRATEGIES = ("joint", "individual")
GATES = ("learned", "public", "private")
DSMTL_PRIVATE_COST = "dsmtl_private_cost"
"""Regularizer name: the (optional) parameter cost of the private stage copies a search keeps."""


def _logit(p: float, name: str) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {p}")
    return math.log(p / (1.0 - p))


class DSMTLDecoder(MultiTaskDecoder):
    """Public encoder + per-task private encoders, gates and decoders (see the module docstring).

    Shared representation: the public neck map (and, for the joint strategy with public stages in a
    task stream, those public stage outputs); branch points: the public backbone features when
    nothing else reads them.  Task parameters: t's private encoder (copies, neck), gate, search
    choices, head and (individual strategy) public head.

    Options:
        strategy: "joint" (DSMTL-JL) or "individual" (DSMTL-IL).
        gate: "learned"; or fixed at "public" (alpha = 1, HPS) or "private" (alpha = 0, single-task).
        gate_init: the initial alpha (share of the public representation).
        private_stages: None (every stage private: the DSMTL model), or task -> backbone stages with
            a private copy (the compact architecture; a task not listed has none).
        search: learn which stages need a private copy (DSMTL-AL); search_tau, search_init: the
            Gumbel temperature and the initial probability of the private copy.
        private_cost: weight of a regularizer on the expected parameters of the chosen copies
            (an mtvision addition, 0 = off: the choice then follows the task losses alone).
        private_init: task -> single-task pretrained folder for its private encoder and head.
        neck_channels, head_channels, norm: as for HPS.
    """

    INIT_OPTIONS = ("private_init",)
    """Options that only initialise weights (a saved model's own weights replace what they load)."""

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        strategy: str = "joint",
        gate: str = "learned",
        gate_init: float = 0.5,
        private_stages: Mapping[str, Sequence[int]] | None = None,
        search: bool = False,
        search_tau: float = 0.1,
        search_init: float = 0.5,
        private_cost: float = 0.0,
        private_init: Mapping[str, str | os.PathLike | None] | None = None,
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown DSMTL strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
        if gate not in GATES:
            raise ValueError(f"unknown DSMTL gate {gate!r} (valid: {', '.join(GATES)})")
        if search and private_stages is not None:
            raise ValueError("DSMTL: search learns private_stages; give one or the other")
        if search_tau <= 0:
            raise ValueError(f"search_tau must be positive, got {search_tau}")
        if private_cost < 0:
            raise ValueError(f"private_cost must be >= 0, got {private_cost}")
        for name in {**(private_stages or {}), **(private_init or {})}:
            if name not in tasks:
                raise unknown_name("task of this DSMTL model", name, tasks)
        self.strategy, self.gate, self.search = strategy, gate, bool(search)
        self.search_tau, self.private_cost = float(search_tau), float(private_cost)
        self.staged = search or private_stages is not None
        init = {t: p for t, p in (private_init or {}).items() if p is not None}

        public = make_backbone()
        channels, strides = list(public.channels), list(public.strides)
        num_stages = len(channels)
        if private_stages is None:
            self.private_stage_ids = {t: list(range(num_stages)) for t in tasks}
        else:
            self.private_stage_ids = {t: sorted({int(s) for s in private_stages.get(t, ())}) for t in tasks}
            for t, ids in self.private_stage_ids.items():
                bad = [s for s in ids if not 0 <= s < num_stages]
                if bad:
                    raise ValueError(f"private_stages[{t}]: stages {bad} out of range (backbone has {num_stages})")
        self.num_stages = num_stages
        # public stages are needed unless every task is its single-task model; the public neck unless
        # no task reads the public representation
        reads_stages = self.staged and (search or any(len(v) < num_stages for v in self.private_stage_ids.values()))
        self.has_public = gate != "private" or reads_stages
        if self.staged:
            self.public_stages = backbone_stages(public).stages
        elif self.has_public:
            self.public_backbone = public
        self.public_neck = MultiScaleNeck(channels, strides, neck_channels, norm=norm) if gate != "private" else None
        self.private_backbones = nn.ModuleDict()
        self.private_copies = nn.ModuleDict()
        self.private_necks = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for t, spec in tasks.items():
            backbone, neck = make_backbone(), MultiScaleNeck(channels, strides, neck_channels, norm=norm)
            head = TaskHead(neck_channels, spec.out_channels, head_channels, norm=norm)
            if t in init:
                load_single_task(init[t], t, backbone, neck, head)
            if self.staged:
                stages = backbone_stages(backbone).stages
                self.private_copies[t] = nn.ModuleDict({str(s): stages[s] for s in self.private_stage_ids[t]})
            else:
                self.private_backbones[t] = backbone
            self.private_necks[t] = neck
            self.heads[t] = head
        if gate == "public":  # every task reads the public representation only: no private encoders
            self.private_backbones, self.private_copies, self.private_necks = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.public_heads = nn.ModuleDict()
        if strategy == "individual" and self.public_neck is not None:
            self.public_heads = nn.ModuleDict(
                {n: TaskHead(neck_channels, s.out_channels, head_channels, norm=norm) for n, s in tasks.items()}
            )
        self.gate_logits = nn.ParameterDict()
        if gate == "learned":
            a = _logit(gate_init, "gate_init")
            self.gate_logits = nn.ParameterDict({t: nn.Parameter(torch.tensor(a)) for t in tasks})
        self.search_logits = nn.ParameterDict()
        if self.search:
            b = _logit(search_init, "search_init")
            self.search_logits = nn.ParameterDict({t: nn.Parameter(torch.full((num_stages,), b)) for t in tasks})
            sizes = [sum(p.numel() for p in s.parameters()) for s in self.public_stages]
            self.register_buffer("stage_share", torch.tensor(sizes, dtype=torch.float32) / max(sum(sizes), 1), persistent=False)
        self.output_stride = min(strides)

    # ------------------------------------------------------------------ gates
    def alpha(self, task: str) -> Tensor | float:
        """alpha_t, the share of the public representation in task t's input."""
        if self.gate == "public":
            return 1.0
        if self.gate == "private":
            return 0.0
        return torch.sigmoid(self.gate_logits[task])

    def private_probability(self, task: str) -> Tensor:
        """Per stage, the searched probability that task t uses its private copy."""
        return torch.sigmoid(self.search_logits[task])

    def _choices(self, task: str) -> Tensor:
        """Per stage, 1 for the private copy and 0 for the public stage (hard; straight-through
        Gumbel samples in training)."""
        b = self.search_logits[task]
        if not self.training:
            return (b >= 0).to(b.dtype)
        logits = torch.stack([F.logsigmoid(-b), F.logsigmoid(b)], -1)  # log(1 - p), log(p)
        return F.gumbel_softmax(logits, tau=self.search_tau, hard=True)[..., 1]

    # ------------------------------------------------------------------ forward
    def _public_reads(self, task: str) -> list[int]:
        """Public stage outputs that task t's stream reads directly (compact architecture)."""
        if self.gate == "public" or not self.staged or self.search:
            return []
        return [s for s in range(self.num_stages) if s not in self.private_stage_ids[task]]

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        individual = self.strategy == "individual" and self.public_neck is not None
        shared: list[Tensor] = []
        branches: list[Tensor] = []
        public_rep: Tensor | None = None
        stream_public: list[Tensor] = []
        if self.has_public:
            raw = run_stages(self.public_stages, images) if self.staged else self.public_backbone(images)
            read = sorted({s for t in tasks for s in self._public_reads(t)})
            if self.search and not individual and self.training:
                read = list(range(self.num_stages))
            neck = self.public_neck
            if individual or not read:
                branches = graph_boundary(raw)
                if neck is not None:
                    (public_rep,) = graph_boundary([neck(branches)])
                    shared = [public_rep]
                stream_public = [f.detach() for f in branches] if individual else branches
            else:  # task streams read public stage outputs: those views and the neck map are the cut
                views = dict(zip(read, graph_boundary([raw[s] for s in read])))
                if neck is not None:
                    (public_rep,) = graph_boundary([neck(raw)])
                shared = [views[s] for s in read] + ([public_rep] if public_rep is not None else [])
                stream_public = [views.get(s, raw[s]) for s in range(self.num_stages)]
        predictions, deep, regularizers = {}, {}, {}
        for t in tasks:
            a = self.alpha(t)
            if self.gate == "public":
                rep = public_rep
            else:
                private = self._private_rep(t, images, stream_public)
                if self.gate == "private":
                    rep = private
                else:
                    gated_public = public_rep.detach() if individual else public_rep
                    rep = a * gated_public + (1 - a) * private
            predictions[t] = self.heads[t](rep)
            if individual and self.training and t in self.public_heads:
                deep[t] = [self.public_heads[t](public_rep)]
        if self.search and self.training and self.private_cost > 0:
            cost = sum((self.private_probability(t) * self.stage_share).sum() for t in tasks) / len(tasks)
            regularizers[DSMTL_PRIVATE_COST] = self.private_cost * cost
        return model_output(predictions, deep_supervision=deep, regularizers=regularizers, shared=shared, branches=branches)

    def _private_rep(self, task: str, images: Tensor, public: list[Tensor]) -> Tensor:
        """R_t: the task stream's neck map."""
        if not self.staged:
            return self.private_necks[task](self.private_backbones[task](images))
        copies = self.private_copies[task]
        choices = self._choices(task) if self.search else None
        feats, x = [], images
        for s in range(self.num_stages):
            if choices is not None:
                c = choices[s]
                if not self.training and not bool(c):
                    x = public[s]
                elif not self.training:
                    x = copies[str(s)](x)
                else:
                    x = c * copies[str(s)](x) + (1 - c) * public[s]
            else:
                x = copies[str(s)](x) if str(s) in copies else public[s]
            feats.append(x)
        return self.private_necks[task](feats)

    # ------------------------------------------------------------------ parameters
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.tasks:
            raise unknown_name("task of this model", task, self.tasks)
        for group in (self.private_backbones, self.private_copies, self.private_necks, self.heads, self.public_heads):
            if task in group:
                yield from group[task].parameters()
        for group in (self.gate_logits, self.search_logits):
            if task in group:
                yield group[task]

    def state_scalars(self) -> dict[str, float]:
        out = {}
        for t in self.gate_logits:
            out[f"dsmtl/alpha/{t}"] = float(torch.sigmoid(self.gate_logits[t].detach()))
        for t in self.search_logits:
            for s, p in enumerate(torch.sigmoid(self.search_logits[t].detach()).tolist()):
                out[f"dsmtl/private/{t}/{s}"] = p
        return out


# ---------------------------------------------------------------------- compact architecture
def _dsmtl(model: nn.Module) -> DSMTLDecoder:
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, DSMTLDecoder):
        raise TypeError(f"expected a DSMTL model, got {type(decoder).__name__}")
    return decoder


def derive_private_stages(model: nn.Module) -> dict[str, list[int]]:
    """Per task, the stages a searched DSMTL model keeps a private copy of (probability >= 0.5)."""
    decoder = _dsmtl(model)
    if not decoder.search:
        return {t: list(v) for t, v in decoder.private_stage_ids.items()}
    return {t: [s for s, b in enumerate(decoder.search_logits[t].tolist()) if b >= 0] for t in decoder.tasks}


# ---------------------------------------------------------------------- private init
def load_single_task(
    folder: str | os.PathLike, task: str, backbone: Backbone, neck: nn.Module, head: nn.Module
) -> None:
    """Load task `task`'s backbone, neck and head of the HPS pretrained folder `folder` into the
    given modules (CheckpointError naming the tensor and both shapes where they do not fit)."""
    from mtvision.models.folders import read_config, read_weights, resolve_folder
    from mtvision.models.saving import WEIGHTS_NAME

    where = f"private_init[{task}]"
    path = resolve_folder(folder)
    config = read_config(path)
    if config.decoder != "hps":
        raise CheckpointError(f"{where}: {path} holds a {config.decoder!r} model; DSMTL starts from single-task HPS runs")
    if task not in config.tasks:
        raise CheckpointError(f"{where}: {path} is a model of {', '.join(config.tasks)}, not of {task!r}")
    if config.backbone.name != backbone.name:
        raise CheckpointError(
            f"{where}: {path} has backbone {config.backbone.name!r}, this model {backbone.name!r}"
        )
    state = read_weights(path / WEIGHTS_NAME)
    parts: dict[str, tuple[str, nn.Module]] = {
        "backbone": ("decoder.backbone.", backbone),
        "neck": ("decoder.neck.", neck),
        "head": (f"decoder.heads.{task}.", head),
    }
    for label, (prefix, module) in parts.items():
        source = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        own = module.state_dict()
        for key, value in source.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(
                    f"{where}: tensor {prefix + key!r} of {path / WEIGHTS_NAME} has shape {tuple(value.shape)}, "
                    f"the private {label} expects {tuple(own[key].shape)}"
                )
        missing = sorted(set(own) - set(source))
        unexpected = sorted(set(source) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: the {label} of {path / WEIGHTS_NAME} does not fit: {len(missing)} missing tensors "
                f"{[prefix + k for k in missing[:5]]}, {len(unexpected)} unexpected {[prefix + k for k in unexpected[:5]]}"
            )
        module.load_state_dict(source, strict=True)
