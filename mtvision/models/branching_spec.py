"""`BranchingSpec`: which tasks share which copy of each backbone stage (a tree), as plain data.

A spec lists the tasks and, for every backbone stage from input to output, a partition of the
tasks into groups; each group at a stage runs its own copy of that stage.  The partition at stage
k must refine the one at stage k-1 (once branches split they never merge), so the spec is a tree
whose root is the input image and whose leaves feed the task heads.  On disk it is a small YAML
(or JSON) file a person can read and edit:

    backbone: resnet18
    tasks: [semseg, depth, normals, edge]
    stages:
      - [[semseg, depth, normals, edge]]
      - [[semseg, depth, normals, edge]]
      - [[semseg, depth], [normals, edge]]
      - [[semseg], [depth], [normals, edge]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtvision.atomic import atomic_write_bytes
from mtvision.errors import MTVisionError, closest

Group = tuple[str, ...]
Partition = tuple[Group, ...]

_KEYS = ("backbone", "tasks", "stages")


class SpecError(MTVisionError, ValueError):
    """A branching spec that is malformed, not a tree, or does not fit the model it is used with."""


def _hint(name: str, choices: Sequence[str]) -> str:
    found = closest(name, choices)
    return f"; did you mean {found!r}?" if found else ""


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpecError(f"{what} must be a list of task names, got {value!r}")
    for v in value:
        if not isinstance(v, str):
            raise SpecError(f"{what} must hold task names (strings), got {v!r} ({type(v).__name__})")
    return tuple(value)


@dataclass(frozen=True)
class BranchingSpec:
    """Tasks, an optional backbone name, and one partition of the tasks per backbone stage.

    Attributes:
        tasks: task names, in model order.
        stages: per stage (input to output), the groups of tasks sharing one copy of that stage.
        backbone: the timm backbone the spec was written for (None: any backbone with as many stages).
    """

    tasks: tuple[str, ...]
    stages: tuple[Partition, ...]
    backbone: str | None = None

    def __post_init__(self) -> None:
        tasks = _names(self.tasks, "spec 'tasks'")
        if not tasks:
            raise SpecError("spec 'tasks' must name at least one task")
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise SpecError(f"spec 'tasks' lists {dupes} more than once")
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise SpecError(f"spec 'backbone' must be a timm model name, got {self.backbone!r}")
        raw = self.stages
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
            raise SpecError(
                f"spec 'stages' must be a non-empty list with one partition per backbone stage, got {raw!r}"
            )
        stages = tuple(self._partition(k, p, tasks) for k, p in enumerate(raw))
        for k in range(1, len(stages)):
            for group in stages[k]:
                parents = {i for i, g in enumerate(stages[k - 1]) for t in group if t in g}
                if len(parents) > 1:
                    merged = " and ".join(_flow(stages[k - 1][i]) for i in sorted(parents))
                    raise SpecError(
                        f"stage {k} group {_flow(group)} merges the stage-{k - 1} groups {merged}: a branching "
                        "tree never merges branches (each partition must refine the previous stage's)"
                    )
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "stages", stages)

    @staticmethod
    def _partition(stage: int, groups: Any, tasks: tuple[str, ...]) -> Partition:
        example = "e.g. [[semseg, depth], [normals]]"
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
            raise SpecError(
                f"stage {stage} must be a non-empty list of groups (lists of task names), {example}; got {groups!r}"
            )
        if any(isinstance(g, str) for g in groups):
            raise SpecError(
                f"stage {stage} must be a list of groups, each a list of task names ({example}); got {list(groups)!r} "
                "(wrap a single shared group in a second pair of brackets)"
            )
        seen: dict[str, int] = {}
        out = []
        for i, group in enumerate(groups):
            names = _names(group, f"stage {stage} group {i}")
            if not names:
                raise SpecError(f"stage {stage} group {i} is empty: every copy of a stage must serve at least one task")
            for t in names:
                if t not in tasks:
                    raise SpecError(
                        f"stage {stage} names unknown task {t!r}{_hint(t, tasks)} (spec tasks: {', '.join(tasks)})"
                    )
                if t in seen:
                    where = "twice in one group" if seen[t] == i else "in two groups"
                    raise SpecError(f"stage {stage} puts task {t!r} {where}: each task uses exactly one copy per stage")
                seen[t] = i
            out.append(names)
        missing = [t for t in tasks if t not in seen]
        if missing:
            raise SpecError(
                f"stage {stage} leaves task(s) {missing} without a group, so they would have no path to their head: "
                "every stage must place every task"
            )
        return tuple(out)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def all_shared(cls, tasks: Sequence[str], num_stages: int, backbone: str | None = None) -> BranchingSpec:
        """Every stage shared by all tasks (hard parameter sharing; the cheapest tree)."""
        return cls(tuple(tasks), tuple((tuple(tasks),) for _ in range(_positive(num_stages))), backbone)

    @classmethod
    def separate(cls, tasks: Sequence[str], num_stages: int, backbone: str | None = None) -> BranchingSpec:
        """One copy of every stage per task (independent single-task networks)."""
        return cls(tuple(tasks), tuple(tuple((t,) for t in tasks) for _ in range(_positive(num_stages))), backbone)

    @classmethod
    def from_labels(
        cls, tasks: Sequence[str], labels: Sequence[Sequence[Hashable]], backbone: str | None = None
    ) -> BranchingSpec:
        """A spec from per-stage branch labels: `labels[k][i]` is task i's branch at stage k (tasks with
        equal labels at a stage share a copy); groups are ordered by first appearance."""
        stages = []
        for k, row in enumerate(labels):
            if len(row) != len(tasks):
                raise SpecError(f"labels for stage {k} give {len(row)} entries for {len(tasks)} tasks")
            groups: dict[Hashable, list[str]] = {}
            for t, lab in zip(tasks, row):
                groups.setdefault(lab, []).append(t)
            stages.append(tuple(tuple(g) for g in groups.values()))
        return cls(tuple(tasks), tuple(stages), backbone)

    def canonical(self) -> BranchingSpec:
        """The same tree with groups (and tasks inside groups) in task order, for comparing specs."""
        order = {t: i for i, t in enumerate(self.tasks)}
        stages = tuple(
            tuple(sorted((tuple(sorted(g, key=order.__getitem__)) for g in p), key=lambda g: order[g[0]]))
            for p in self.stages
        )
        return BranchingSpec(self.tasks, stages, self.backbone)

    # ------------------------------------------------------------------------------ queries
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def num_copies(self, stage: int) -> int:
        """How many copies of backbone stage `stage` the tree runs."""
        return len(self.stages[self._stage(stage)])

    def group_of(self, task: str, stage: int) -> int:
        """Index of the group (copy) `task` uses at `stage`."""
        if task not in self.tasks:
            raise SpecError(f"unknown task {task!r}{_hint(task, self.tasks)} (spec tasks: {', '.join(self.tasks)})")
        return next(i for i, g in enumerate(self.stages[self._stage(stage)]) if task in g)

    def path(self, task: str) -> tuple[int, ...]:
        """The copy `task` uses at every stage."""
        return tuple(self.group_of(task, k) for k in range(self.num_stages))

    def parent(self, stage: int, group: int) -> int | None:
        """The group at `stage - 1` that feeds copy `group` of `stage` (None at stage 0)."""
        stage = self._stage(stage)
        return None if stage == 0 else self.group_of(self.stages[stage][group][0], stage - 1)

    def shared_depth(self) -> int:
        """How many leading stages all tasks share (0 when they split at the first stage)."""
        return next((k for k, p in enumerate(self.stages) if len(p) > 1), self.num_stages)

    def check(
        self, *, tasks: Sequence[str] | None = None, num_stages: int | None = None, backbone: str | None = None
    ) -> None:
        """Raise SpecError unless the spec fits a model with these tasks, stage count and backbone."""
        if tasks is not None and set(tasks) != set(self.tasks):
            extra = [t for t in self.tasks if t not in tasks]
            absent = [t for t in tasks if t not in self.tasks]
            parts = []
            if extra:
                hints = "".join(_hint(t, list(tasks)) for t in extra[:1])
                parts.append(f"names task(s) {extra} the model does not have{hints}")
            if absent:
                parts.append(f"leaves the model's task(s) {absent} without a head")
            raise SpecError(f"the branching spec {' and '.join(parts)} (model tasks: {', '.join(tasks)})")
        if backbone is not None and self.backbone is not None and backbone != self.backbone:
            raise SpecError(
                f"the branching spec was written for backbone {self.backbone!r} but the model uses {backbone!r}; "
                "set the spec's 'backbone' to match (or remove it)"
            )
        if num_stages is not None and self.num_stages != num_stages:
            name = backbone or self.backbone or "the backbone"
            if self.num_stages > num_stages:
                raise SpecError(
                    f"the branching spec has {self.num_stages} stages but {name} has {num_stages}: stage index "
                    f"{num_stages} is beyond the backbone (stages are 0..{num_stages - 1})"
                )
            raise SpecError(
                f"the branching spec has {self.num_stages} stages but {name} has {num_stages}: give one partition "
                "per backbone stage"
            )

    def _stage(self, stage: int) -> int:
        if not 0 <= stage < self.num_stages:
            raise SpecError(
                f"stage index {stage} is beyond the spec's {self.num_stages} stages (0..{self.num_stages - 1})"
            )
        return stage

    # ------------------------------------------------------------------------------ text
    def describe(self) -> str:
        """A short text tree: each node is a run of stages that a set of tasks shares."""
        copies = sum(len(p) for p in self.stages)
        lines = [
            f"{self.backbone or 'any backbone'}: {len(self.tasks)} tasks, {self.num_stages} stages, {copies} stage copies"
        ]

        def node(stage: int, group: int, prefix: str, last: bool, root: bool) -> None:
            tasks = self.stages[stage][group]
            end = stage
            while end + 1 < self.num_stages and len(self._children(end, group)) == 1:
                group = self._children(end, group)[0]
                end += 1
            span = f"{stage}" if end == stage else f"{stage}-{end}"
            label = f"[stage {span}] {', '.join(tasks)}"
            lines.append(label if root else prefix + ("└── " if last else "├── ") + label)
            kids = self._children(end, group) if end + 1 < self.num_stages else []
            inner = "" if root else prefix + ("    " if last else "│   ")
            for i, k in enumerate(kids):
                node(end + 1, k, inner, i == len(kids) - 1, False)

        roots = len(self.stages[0])
        if roots > 1:
            lines.append("image")
        for g in range(roots):
            node(0, g, "", g == roots - 1, roots == 1)
        return "\n".join(lines)

    def _children(self, stage: int, group: int) -> list[int]:
        return [i for i, g in enumerate(self.stages[stage + 1]) if g[0] in self.stages[stage][group]]

    def __str__(self) -> str:
        return self.describe()

    # ------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, strings) for YAML, JSON or a model config's decoder options."""
        out: dict[str, Any] = {} if self.backbone is None else {"backbone": self.backbone}
        out["tasks"] = list(self.tasks)
        out["stages"] = [[list(g) for g in p] for p in self.stages]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BranchingSpec:
        """Strictly parse a dict with keys `tasks`, `stages` and optionally `backbone`."""
        if isinstance(data, BranchingSpec):
            return data
        if not isinstance(data, Mapping):
            raise SpecError(f"a branching spec must be a mapping with keys {list(_KEYS)}, got {type(data).__name__}")
        for key in data:
            if key not in _KEYS:
                raise SpecError(
                    f"unknown branching spec key {key!r}{_hint(str(key), _KEYS)} (valid: {', '.join(_KEYS)})"
                )
        missing = [k for k in ("tasks", "stages") if k not in data]
        if missing:
            raise SpecError(f"branching spec is missing key(s) {missing}")
        return cls(data["tasks"], data["stages"], data.get("backbone"))

    def to_yaml(self) -> str:
        """YAML text, one flow-style partition per line, with the tree as a comment."""
        lines = ["# " + line for line in self.describe().splitlines()]
        if self.backbone is not None:
            lines.append(f"backbone: {_flow(self.backbone)}")
        lines.append(f"tasks: {_flow(list(self.tasks))}")
        lines.append("stages:  # one partition of the tasks per backbone stage, input to output")
        lines += [f"  - {_flow([list(g) for g in p])}" for p in self.stages]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """JSON text, one partition per line."""
        head = json.dumps({k: v for k, v in self.to_dict().items() if k != "stages"})[:-1]
        stages = ",\n".join("    " + json.dumps([list(g) for g in p]) for p in self.stages)
        return f'{head}, "stages": [\n{stages}\n]}}\n'

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec atomically: JSON for a `.json` path, YAML otherwise."""
        text = self.to_json() if Path(path).suffix.lower() == ".json" else self.to_yaml()
        atomic_write_bytes(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BranchingSpec:
        """Read a YAML or JSON spec file (YAML via yaml.safe_load, which also reads JSON)."""
        file = Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read branching spec file {str(file)!r}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"branching spec file {str(file)!r} is not valid YAML/JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except SpecError as exc:
            raise SpecError(f"{file}: {exc}") from None


def _positive(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"the number of stages must be a positive integer, got {n!r}")
    return n


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf")).strip().removesuffix("\n...").strip()
    )


def as_spec(spec: BranchingSpec | Mapping[str, Any] | str | os.PathLike) -> BranchingSpec:
    """A `BranchingSpec` from a spec, a mapping, or a path to a YAML/JSON spec file."""
    if isinstance(spec, BranchingSpec):
        return spec
    if isinstance(spec, Mapping):
        return BranchingSpec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        return BranchingSpec.load(spec)
    raise SpecError(f"a branching spec must be a mapping or a path to a YAML/JSON file, got {type(spec).__name__}")
