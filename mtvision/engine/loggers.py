"""Experiment loggers: a JSON-lines file, Weights & Biases and TensorBoard, behind one interface, plus
the console metrics table (`format_metrics_table`) the trainer and `mtv-eval` print.

Key convention for `log_scalars`: callers name values `<split>/<group>/<name>`, e.g.
``train/loss``, ``train/loss/semseg``, ``train/lr``, ``val/semseg/mIoU``, ``val/depth/rmse``,
``val/score``.  Loggers keep keys exactly as given.

wandb is imported only when a `WandbLogger` is built.  It honours WANDB_MODE (e.g. ``offline``) and
WANDB_DIR from the environment unless `mode` / `dir` are given; nothing here logs in.  A run folder
keeps its W&B run id in ``wandb_run_id``, so that a resumed training continues the same W&B run.
tensorboard (torch.utils.tensorboard) is imported only when a `TensorBoardLogger` is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mtvision.atomic import atomic_write_bytes
from mtvision.errors import MTVisionError
from mtvision.tasks import IGNORE_INDEX, get_task
from mtvision.visualize import image_grid


@dataclass
class PredictionPanel:
    """One sample's picture, decoded predictions and targets, for visual logging.

    Attributes:
        image: H x W x 3 uint8 RGB (de-normalised input).
        predictions: task -> decoded numpy map (label maps H x W int, depth H x W metres,
            normals H x W x 3, probabilities H x W).
        targets: task -> the ground truth in the same layout (a task may be missing).
        class_names: task -> class names for label-map tasks, or None.
        sample_id: the dataset id, used as caption.
    """

    image: np.ndarray
    predictions: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    class_names: dict[str, list[str]] | None = None
    sample_id: str = ""

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise MTVisionError(f"panel image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        for kind, maps in (("prediction", self.predictions), ("target", self.targets)):
            for task, array in maps.items():
                if np.asarray(array).shape[:2] != image.shape[:2]:
                    raise MTVisionError(
                        f"{kind} for {task!r} has shape {np.asarray(array).shape}, image is {image.shape[:2]}"
                    )


def to_jsonable(value: Any) -> Any:
    """Plain JSON data from configs and metrics: dataclasses, mappings, sequences, numpy, Paths.

    Non-finite floats become None (JSON has no NaN/Infinity); unknown objects become their str().
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    try:  # 0-d tensors and other number-likes
        return to_jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


def format_metric(value: float) -> str:
    """A metric for tables: 2 decimals from 10 up, 3 from 1, 4 below 1; scientific when tiny or huge."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e5 or 0 < magnitude < 1e-3:
        return f"{value:.2e}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}" if magnitude >= 1 else f"{value:.4f}"


def format_metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """An aligned text table: one row per task, one column per metric name (in first-seen order), '-' where absent."""
    columns: list[str] = []
    for row in metrics.values():
        columns.extend(name for name in row if name not in columns)
    header = ["task", *columns]
    body = [[task, *(format_metric(row[c]) if c in row else "-" for c in columns)] for task, row in metrics.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(w) for cell, w in zip(cells[1:], widths[1:]))]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


class Logger:
    """Interface of every logger; each method is a no-op here so subclasses implement what they support."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the resolved run configuration."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record scalar values at a global step (keys as described in the module docstring)."""

    def log_predictions(self, step: int, panels: Sequence[PredictionPanel]) -> None:
        """Record example predictions next to their targets."""

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: Iterable[str] = ()) -> None:
        """Record a file or folder (a checkpoint, a pretrained folder) as a versioned artifact."""

    def close(self) -> None:
        """Flush and release resources."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlLogger(Logger):
    """Appends one JSON object per line to `path`, flushed at once so a crash loses nothing.

    Lines:
        ``{"step": s, "time": unix_seconds, **values}`` per `log_scalars` call;
        ``{"time": t, "config": {...}}`` per `log_config` call;
        ``{"time": t, "artifact": name, "kind": kind, "path": path, "aliases": [...]}`` per `log_artifact`.
    Non-finite values are written as null, so every line is strict JSON.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            raise MTVisionError(f"JsonlLogger for {self.path} is closed")
        self._file.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._write({"time": time.time(), "config": config})

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._write({"step": int(step), "time": time.time(), **values})

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: Iterable[str] = ()) -> None:
        self._write({"time": time.time(), "artifact": name, "kind": kind, "path": str(path), "aliases": list(aliases)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def colour_pair(
    task_name: str, target: np.ndarray | None, prediction: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """Colour maps of a target and a prediction on one shared scale (colorized side by side, then split)."""
    colorize = get_task(task_name).colorize
    if target is None:
        return None, colorize(prediction)
    width = np.asarray(target).shape[1]
    both = colorize(
        np.concatenate([np.asarray(target, dtype=np.float32), np.asarray(prediction, dtype=np.float32)], axis=1)
    )
    return both[:, :width], both[:, width:]


def class_labels(panel: PredictionPanel, task: str) -> dict[int, str]:
    """wandb mask labels: id -> name for every id present in the prediction or target of `task`."""
    names = (panel.class_names or {}).get(task) or []
    present = {
        int(v)
        for array in (panel.predictions.get(task), panel.targets.get(task))
        if array is not None
        for v in np.unique(array)
    }
    labels = {i: (names[i] if i < len(names) else str(i)) for i in sorted(present) if i != IGNORE_INDEX}
    if IGNORE_INDEX in present:
        labels[IGNORE_INDEX] = "ignore"
    return labels


class WandbLogger(Logger):
    """Logs to a Weights & Biases run; `mode=None` and `dir=None` defer to WANDB_MODE / WANDB_DIR;
    `id` and `resume` (e.g. "allow") continue an earlier run (`build_loggers(..., resume=True)`).

    Predictions go to ``<prediction_key>/<task>``: label-map tasks as the input image with
    'prediction' and 'ground_truth' mask overlays, other tasks as one picture
    ``image | target | prediction`` with target and prediction on a shared colour scale.
    Artifact names are sanitised to the characters wandb accepts (letters, digits, '-', '_', '.').
    wandb drops rows whose step is lower than one already logged, so steps must not decrease.
    `close` finishes the run; in offline mode the ``.wandb`` file is complete only once
    ``wandb.teardown()`` has run (wandb calls it at interpreter exit).
    """

    def __init__(
        self,
        project: str,
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        dir: str | Path | None = None,
        mode: str | None = None,
        prediction_key: str = "val/predictions",
        id: str | None = None,
        resume: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as error:  # pragma: no cover - wandb is a declared dependency
            raise MTVisionError("logging to wandb needs the `wandb` package; set logging.wandb: false") from error
        self._wandb = wandb
        self.prediction_key = prediction_key
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags) or None,
            config=to_jsonable(config) if config is not None else None,
            dir=str(dir) if dir is not None else None,
            mode=mode,
            id=id,
            resume=resume,
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(to_jsonable(config), allow_val_change=True)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        # floats stay floats (NaN included: wandb shows it as a gap); tensors and numpy scalars become numbers
        numbers = {key: value if isinstance(value, (bool, int)) else float(value) for key, value in values.items()}
        self.run.log(numbers, step=int(step))

    def log_predictions(self, step: int, panels: Sequence[PredictionPanel]) -> None:
        media: dict[str, list[Any]] = {}
        for panel in panels:
            for task, prediction in panel.predictions.items():
                media.setdefault(f"{self.prediction_key}/{task}", []).append(self._picture(panel, task, prediction))
        if media:
            self.run.log(media, step=int(step))

    def _picture(self, panel: PredictionPanel, task: str, prediction: np.ndarray) -> Any:
        target = panel.targets.get(task)
        if get_task(task).is_label_map:
            labels = class_labels(panel, task)
            masks = {"prediction": {"mask_data": np.asarray(prediction).astype(np.uint8), "class_labels": labels}}
            if target is not None:
                masks["ground_truth"] = {"mask_data": np.asarray(target).astype(np.uint8), "class_labels": labels}
            return self._wandb.Image(panel.image, masks=masks, caption=panel.sample_id)
        target_rgb, prediction_rgb = colour_pair(task, target, prediction)
        tiles = [panel.image, prediction_rgb] if target_rgb is None else [panel.image, target_rgb, prediction_rgb]
        caption = f"{panel.sample_id}: image | " + ("prediction" if target_rgb is None else "target | prediction")
        return self._wandb.Image(image_grid([tiles]), caption=caption)

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: Iterable[str] = ()) -> None:
        path = Path(path)
        if not path.exists():
            raise MTVisionError(f"cannot log artifact {name!r}: {path} does not exist")
        artifact = self._wandb.Artifact(re.sub(r"[^\w\-.]", "-", name), type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=list(aliases))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as TensorBoard hparams: dotted keys, numbers, bools and strings (others as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in to_jsonable(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class TensorBoardLogger(Logger):
    """Writes TensorBoard event files under `log_dir`: scalars under their keys, prediction pictures as
    ``<prediction_key>/<task>/<i>`` (image | target | prediction, one colour scale), the config as text
    and as hparams (every `val/` scalar declared as an hparams metric when the logger closes).

    A resumed run writes a further event file into the same folder; TensorBoard shows them as one run.
    """

    def __init__(self, log_dir: str | Path, prediction_key: str = "val/predictions") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MTVisionError(
                "logging to TensorBoard needs the `tensorboard` package (pip install tensorboard); "
                "set logging.tensorboard: false"
            ) from error
        self.log_dir = Path(log_dir)
        self.prediction_key = prediction_key
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir))
        self._metric_keys: list[str] = []
        self._hparams: dict[str, bool | int | float | str] | None = None

    def log_config(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```\n" + json.dumps(to_jsonable(config), indent=2) + "\n```", 0)
        self._hparams = flat_hparams(config)
        _, session_start, _ = hparams(self._hparams, {})
        self.writer.file_writer.add_summary(session_start)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), int(step))
            if key.startswith("val/") and key not in self._metric_keys:
                self._metric_keys.append(key)
        self.writer.flush()

    def log_predictions(self, step: int, panels: Sequence[PredictionPanel]) -> None:
        for index, panel in enumerate(panels):
            for task, prediction in panel.predictions.items():
                target_rgb, prediction_rgb = colour_pair(task, panel.targets.get(task), prediction)
                tiles = [panel.image, prediction_rgb] if target_rgb is None else [panel.image, target_rgb, prediction_rgb]
                tag = f"{self.prediction_key}/{task}/{index}"
                self.writer.add_image(tag, image_grid([tiles]), int(step), dataformats="HWC")
        self.writer.flush()

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: Iterable[str] = ()) -> None:
        self.writer.add_text(f"artifacts/{kind}", f"{name}: {path} ({', '.join(aliases)})")

    def close(self) -> None:
        if self.writer is None:
            return
        if self._hparams is not None and self._metric_keys:
            from torch.utils.tensorboard.summary import hparams

            experiment, _, session_end = hparams(self._hparams, dict.fromkeys(self._metric_keys, 0.0))
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_end)
        self.writer.close()
        self.writer = None


class LoggerGroup(Logger):
    """Fans every call out to several loggers; `close` closes all of them even if one fails."""

    def __init__(self, loggers: Iterable[Logger] = ()) -> None:
        self.loggers = list(loggers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_scalars(values, step)

    def log_predictions(self, step: int, panels: Sequence[PredictionPanel]) -> None:
        for logger in self.loggers:
            logger.log_predictions(step, panels)

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: Iterable[str] = ()) -> None:
        aliases = list(aliases)
        for logger in self.loggers:
            logger.log_artifact(path, name, kind, aliases)

    def close(self) -> None:
        first_error: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as error:  # close the others before re-raising
                first_error = first_error or error
        if first_error is not None:
            raise first_error


WANDB_ID_FILE = "wandb_run_id"
"""The file in a run folder that holds its W&B run id, for `build_loggers(..., resume=True)`."""
TENSORBOARD_DIR = "tensorboard"
"""The folder in a run folder that holds its TensorBoard event files."""


def build_loggers(
    output_dir: str | Path,
    *,
    jsonl: bool = True,
    wandb: bool = False,
    wandb_project: str = "mtvision",
    wandb_entity: str | None = None,
    wandb_run_name: str | None = None,
    wandb_tags: Sequence[str] = (),
    tensorboard: bool = False,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    is_main_process: bool = True,
) -> LoggerGroup:
    """The loggers a run asks for; an empty group on non-main processes.

    JSONL goes to ``<output_dir>/metrics.jsonl`` (appended), TensorBoard event files to
    ``<output_dir>/tensorboard/``, wandb files under `output_dir` unless WANDB_DIR is set.  The W&B run
    id is written to ``<output_dir>/wandb_run_id``; with `resume` and that file present, the same W&B
    run is continued (``resume="allow"``), else a new run starts and its id replaces the file's.
    `config` is recorded through every logger's `log_config`.
    """
    if not is_main_process:
        return LoggerGroup()
    output_dir = Path(output_dir)
    loggers: list[Logger] = []
    if jsonl:
        loggers.append(JsonlLogger(output_dir / "metrics.jsonl"))
    if wandb:
        wandb_dir = None if os.environ.get("WANDB_DIR") else output_dir
        id_file = output_dir / WANDB_ID_FILE
        run_id = _read_run_id(id_file) if resume else None
        logger = WandbLogger(
            wandb_project, entity=wandb_entity, name=wandb_run_name, tags=wandb_tags, dir=wandb_dir,
            id=run_id, resume="allow" if run_id else None,
        )
        loggers.append(logger)
        if logger.run is not None and getattr(logger.run, "id", None) and logger.run.id != run_id:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(id_file, f"{logger.run.id}\n".encode())
    if tensorboard:
        loggers.append(TensorBoardLogger(output_dir / TENSORBOARD_DIR))
    group = LoggerGroup(loggers)
    if config is not None:
        group.log_config(config)
    return group


def _read_run_id(path: Path) -> str | None:
    """The W&B run id stored in `path`, or None when there is none (a run that never logged to W&B)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[\w\-]+", text) else None
