"""The package's import layers: no cycle (lazy imports inside functions included), and every import
goes to the importer's own layer or a lower one (see CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mtvision"

# lowest first; a module may import its own layer and those before it
LAYERS = [
    {"errors", "atomic", "config_io", "distributed", "cv"},
    {"visualize", "metrics"},
    {"tasks"},
    {"data"},
    {"models"},
    {"optim"},
    {"config"},
    {"engine"},
    {"search"},
    {"inference", "convert", "export"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The mtvision modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and target.startswith("mtvision."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int:
    top = name.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_subpackage_and_top_module_has_a_layer():
    tops = {name.split(".")[1] for name in _modules() if name.count(".") >= 1}
    assert tops == set().union(*LAYERS)


def test_imports_only_go_down_the_layers():
    wrong = [
        f"{a} -> {b}"
        for a, targets in _graph().items()
        if a != "mtvision"
        for b in targets
        if b != "mtvision" and _layer(b) > _layer(a)
    ]
    assert not wrong, wrong


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import counts: the check would have caught the old lazy cycles."""
    graph = _graph()
    assert "mtvision.optim.weighting" in graph["mtvision.config"]  # imported inside a validate() method
