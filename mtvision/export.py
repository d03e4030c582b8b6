"""Export a `MultiTaskModel` for deployment: ONNX, TorchScript or a torch.export `ExportedProgram`.

The exported graph takes `images` (N x 3 x H x W float32, normalised as the model's `preprocess`
config says) with a dynamic batch size N and a fixed H x W, and returns one named output per task,
in the order asked: the raw maps of `ModelOutput.predictions` (logits, depth, unnormalised normals),
or with `decode=True` what each task's `decode` makes of them (class maps int64, metres, unit normals,
probabilities).  Exporting a subset of the tasks exports only the computation those tasks need (the
model's single-task path).

Each file carries the facts a consumer needs as JSON (`mtvision_export`: tasks, output names, decode,
input size, preprocess, the model config): ONNX as metadata properties, TorchScript and
ExportedProgram files as the extra file `mtvision.json`.  ONNX export needs the `onnx` and `onnxscript`
packages (`pip install onnx onnxscript`); running it, onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtvision import __version__
from mtvision.errors import MTVisionError

FORMATS = ("onnx", "torchscript", "exported-program")
"""What `export_model` writes: an ONNX file (.onnx), a TorchScript archive (.pt), or a `torch.export.save`
archive (.pt2, the suffix `torch.export.load` expects)."""
INPUT_NAME = "images"
EXTRA_FILE = "mtvision.json"
METADATA_KEY = "mtvision_export"
ONNX_OPSET = 18


class ExportError(MTVisionError, ValueError):
    """A model cannot be exported as asked (unknown format, missing input size, missing package)."""


class TaskOutputs(nn.Module):
    """`images -> tuple of per-task maps` in `tasks` order: the graph that gets exported."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], decode: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.decode = decode

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        predictions = self.model(images, self.tasks).predictions
        if not self.decode:
            return tuple(predictions[t] for t in self.tasks)
        return tuple(self.model.tasks[t].decode(predictions[t]) for t in self.tasks)


def export_input_size(model: nn.Module, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The H x W the graph is exported at: `size`, else the model's `preprocess.input_size` (its training size)."""
    pre = model.config.preprocess
    if size is None:
        size = pre.input_size
    if size is None:
        raise ExportError(
            "the model's config has no preprocess.input_size: give the export size (mtv-export --size H W, "
            f"multiples of {pre.size_divisor})"
        )
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"export size must be H W with positive values, got {list(size)}")
    height, width = int(size[0]), int(size[1])
    if pre.mode == "pad" and (height % pre.size_divisor or width % pre.size_divisor):
        raise ExportError(
            f"export size {height}x{width} is not a multiple of the model's size divisor {pre.size_divisor}"
        )
    return height, width


def export_metadata(model: nn.Module, tasks: Sequence[str], decode: bool, size: tuple[int, int]) -> dict[str, Any]:
    """The JSON facts stored with an exported file (see the module docstring)."""
    return {
        "mtvision_version": __version__,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size[0], size[1]], "dtype": "float32"},
        "outputs": list(tasks),
        "decode": decode,
        "preprocess": model.config.to_dict()["preprocess"],
        "config": model.config.to_dict(),
    }


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    tasks: Sequence[str] | None = None,
    size: Sequence[int] | None = None,
    decode: bool = False,
    example_batch: int = 2,
    optimize: bool = True,
) -> Path:
    """Write `model` (a `MultiTaskModel`) as `format` (see FORMATS) to `out`; returns the path.

    Args:
        tasks: the outputs, in order (None: all tasks of the model).
        size: H, W of the exported input (None: the model's preprocess.input_size).
        decode: output decoded maps instead of raw ones.
        example_batch: the batch size of the example input that is traced (the exported batch is dynamic).
        optimize: ONNX only: run the exporter's graph optimiser (constant folding, dead-code removal);
            onnxruntime optimises the graph again when it loads it.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (valid: {', '.join(FORMATS)})")
    names = model.select_tasks(tasks)
    height, width = export_input_size(model, size)
    wrapper = TaskOutputs(model.eval(), names, decode).eval()
    device = next(model.parameters()).device
    example = torch.randn(max(2, int(example_batch)), 3, height, width, device=device)
    meta = json.dumps(export_metadata(model, names, decode, (height, width)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if format == "onnx":
            _export_onnx(wrapper, example, names, out, meta, optimize)
        elif format == "torchscript":
            _export_torchscript(wrapper, example, out, meta)
        else:
            _export_program(wrapper, example, out, meta)
    return out


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=4096)


def _export_onnx(wrapper: TaskOutputs, example: Tensor, names: list[str], out: Path, meta: str, optimize: bool) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages (pip install onnx onnxscript): {exc}") from None
    big = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > 1.8 * 2**30
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes={"images": {0: _batch_dim()}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=big,
            optimize=optimize,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_KEY: meta})
    if big:  # over protobuf's 2 GiB: the weights go to <out>.data next to the graph
        onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save_model(model, str(out))


def _export_torchscript(wrapper: TaskOutputs, example: Tensor, out: Path, meta: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the fixed image size and deprecation notes
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(out), _extra_files={EXTRA_FILE: meta})


def _export_program(wrapper: TaskOutputs, example: Tensor, out: Path, meta: str) -> None:
    program = torch.export.export(wrapper, (example,), dynamic_shapes={"images": {0: _batch_dim()}}, strict=False)
    torch.export.save(program, str(out), extra_files={EXTRA_FILE: meta})


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `export_metadata` JSON stored in an exported file of any of the FORMATS."""
    path = Path(path)
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY in props:
            return json.loads(props[METADATA_KEY])
    except Exception:  # not an ONNX file (or no onnx package): try the zip archives
        pass
    import zipfile

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(f"extra/{EXTRA_FILE}") or name.endswith(f"/{EXTRA_FILE}"):
                return json.loads(archive.read(name))
    raise ExportError(f"{path} holds no mtvision export metadata")


def load_exported(path: str | os.PathLike, format: str) -> Any:
    """A callable `images (N x 3 x H x W float32 numpy) -> list of numpy maps` running an exported file:
    onnxruntime on CPU for ONNX, `torch.jit.load` / `torch.export.load` for the others."""
    import numpy as np

    path = str(path)
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("running an ONNX file needs onnxruntime (pip install onnxruntime)") from None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(path, map_location="cpu")
    elif format == "exported-program":
        module = torch.export.load(path).module()
    else:
        raise ExportError(f"unknown export format {format!r} (valid: {', '.join(FORMATS)})")

    def run(images: Any) -> list[Any]:
        with torch.no_grad():
            return [o.numpy() for o in module(torch.as_tensor(images, dtype=torch.float32))]

    return run


def check_export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str,
    tasks: Sequence[str] | None = None,
    size: Sequence[int] | None = None,
    decode: bool = False,
    batch: int = 3,
) -> float:
    """The largest absolute difference between the exported file and `model` on a random batch of `batch`
    images (a batch size other than the traced one, to check that the batch is dynamic)."""
    import numpy as np

    names = model.select_tasks(tasks)
    height, width = export_input_size(model, size)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = TaskOutputs(model.eval().cpu(), names, decode)(images)
    got = load_exported(path, format)(images.numpy())
    return max(float(np.abs(w.numpy().astype(np.float64) - g.astype(np.float64)).max()) for w, g in zip(want, got))
