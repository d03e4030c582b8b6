"""The README.md model card that `push_to_hub` writes next to config.json and model.safetensors.

The card says what a person deciding whether to use the model needs: the tasks and what each map means,
the architecture, the metrics with the command that produced them, the training data, the licence,
how to load it, and the full config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtvision.errors import MTVisionError

TASK_OUTPUTS = {
    "semseg": "semantic class map (H x W ints)",
    "parts": "human-part class map (H x W ints)",
    "depth": "depth in metres (H x W floats)",
    "normals": "unit surface normals in the camera frame (H x W x 3)",
    "edge": "boundary probability (H x W in [0, 1])",
    "saliency": "saliency probability (H x W in [0, 1])",
    "texture": "synthetic accent-texture mask (H x W ints)",
}
TASK_TAGS = {"semseg": "semantic-segmentation", "depth": "depth-estimation", "normals": "surface-normals-estimation"}


def read_metrics(path: str | os.PathLike) -> tuple[dict[str, dict[str, float]], str | None, str | None]:
    """(task -> metric -> value, the command, the split) of an `mtv-eval` metrics JSON
    (`{"split", "metrics", "command"?}`) or of a plain `{task: {metric: value}}` JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MTVisionError(f"cannot read metrics JSON {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MTVisionError(f"metrics JSON {path}: expected an object")
    metrics = data.get("metrics", data)
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise MTVisionError(f"metrics JSON {path}: expected task -> metric -> value")
    command = data.get("command")
    if isinstance(command, list):
        command = " ".join(str(c) for c in command)
    return metrics, command if isinstance(command, str) else None, data.get("split")


def _front_matter(license: str, tasks: list[str], data: str | None) -> str:
    tags = ["mtvision", "multi-task-learning", "dense-prediction", *(TASK_TAGS[t] for t in tasks if t in TASK_TAGS)]
    lines = ["---", "library_name: mtvision", f"license: {license}", "tags:", *(f"- {t}" for t in tags), "---"]
    return "\n".join(lines)


def _metrics_section(metrics: Mapping[str, Mapping[str, Any]], command: str | None, split: str | None) -> list[str]:
    out = ["## Metrics", ""]
    if split:
        out += [f"On the `{split}` split.", ""]
    out += ["| task | metric | value |", "|---|---|---|"]
    for task, row in metrics.items():
        for name, value in row.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            out.append(f"| {task} | {name} | {shown} |")
    out.append("")
    if command:
        out += ["Produced by:", "", "```bash", command, "```", ""]
    else:
        out += ["(The command that produced these figures was not recorded.)", ""]
    return out


def model_card(
    config: Mapping[str, Any],
    repo_id: str | None = None,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    command: str | None = None,
    split: str | None = None,
    data: str | None = None,
    license: str = "apache-2.0",
    experiment_config: str | None = None,
    num_parameters: int | None = None,
) -> str:
    """Markdown model card for a pretrained folder's `config` (the config.json dict)."""
    tasks = list(config.get("tasks", {}))
    backbone = config.get("backbone", {}).get("name", "?")
    decoder = config.get("decoder", "?")
    title = repo_id.split("/")[-1] if repo_id else f"{decoder} on {backbone}"
    lines = [_front_matter(license, tasks, data), "", f"# {title}", ""]
    lines += [
        f"A multi-task dense-prediction model made with [mtvision](https://pypi.org/project/mtvision/): one forward "
        f"pass predicts {', '.join(tasks)}.",
        "",
        "## Tasks",
        "",
        "| task | output |",
        "|---|---|",
    ]
    for task, classes in config.get("tasks", {}).items():
        output = TASK_OUTPUTS.get(task, "")
        if classes:
            output = f"{classes} classes: {output}"
        lines.append(f"| {task} | {output} |")
    pre = config.get("preprocess", {})
    lines += ["", "## Model", "", "| | |", "|---|---|", f"| backbone | `{backbone}` (timm) |", f"| decoder | `{decoder}` |"]
    if num_parameters is not None:
        lines.append(f"| parameters | {num_parameters / 1e6:.1f}M |")
    if pre:
        size = pre.get("input_size")
        how = f"{pre.get('mode')}" + (f" to {size[0]}x{size[1]}" if size else f" to a multiple of {pre.get('size_divisor')}")
        lines.append(f"| input | RGB, {how}, mean {pre.get('mean')}, std {pre.get('std')} |")
    lines.append("")
    if metrics:
        lines += _metrics_section(metrics, command, split)
    lines += ["## Data", "", data or "Not recorded.", ""]
    name = f"hf-hub:{repo_id}" if repo_id else "path/to/folder"
    lines += [
        "## Usage",
        "",
        "```python",
        "import mtvision",
        "",
        f'predictor = mtvision.load("{name}")',
        "maps = predictor.predict(image)  # image: H x W x 3 uint8 RGB, a PIL image or a path",
        "```",
        "",
        f"or `mtv-predict --model {name} --input photo.jpg --out predictions/`.",
        "",
        "The repo holds `config.json` (everything needed to rebuild the model and preprocess input) and "
        "`model.safetensors` (the weights), the layout of huggingface_hub's `PyTorchModelHubMixin`.",
        "",
        "## Licence",
        "",
        f"`{license}`.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(dict(config), indent=2),
        "```",
        "",
    ]
    if experiment_config:
        lines += ["Training config:", "", "```yaml", experiment_config.rstrip("\n"), "```", ""]
    return "\n".join(lines)
