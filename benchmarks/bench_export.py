"""Export time and runtime speed of an exported model: PyTorch eager vs TorchScript vs ONNX Runtime
(and the torch.export ExportedProgram), on CPU.

    OMP_NUM_THREADS=2 python benchmarks/bench_export.py [--backbone resnet18] [--height 288 --width 384]
        [--batch 1] [--threads 2] [--repeats 20]

The model is an HPS multi-task model (semseg 40 classes, depth, normals, edge) with random weights.
Export time is the wall time of `mtvision.export.export_model` for each format.  Runtime is the
median wall time of one forward pass on a fixed random batch (after warm-up), the runtimes measured
interleaved so that load from other processes hits all of them alike; every runtime's outputs are
checked against eager PyTorch first.  ONNX Runtime runs on the CPU execution provider with
`--threads` intra-op threads, PyTorch with `torch.set_num_threads(--threads)`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtvision.export import FORMATS, TaskOutputs, export_model, load_exported
from mtvision.models import create_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--decoder", default="hps")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(
        backbone=args.backbone, decoder=args.decoder, tasks={"semseg": 40, "depth": None, "normals": None, "edge": None}
    ).eval()
    model.config.preprocess.input_size = [args.height, args.width]
    images = torch.randn(args.batch, 3, args.height, args.width, generator=torch.Generator().manual_seed(1))
    eager = TaskOutputs(model, model.task_names).eval()
    with torch.no_grad():
        reference = [o.numpy() for o in eager(images)]

    def run_eager(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [o.numpy() for o in eager(torch.from_numpy(x))]

    runners = {"eager": run_eager}
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
    export_seconds, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            path = Path(tmp) / f"model{suffix[fmt]}"
            start = time.perf_counter()
            export_model(model, path, fmt)
            export_seconds[fmt] = time.perf_counter() - start
            sizes[fmt] = path.stat().st_size / 2**20
            if fmt == "onnx":
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.inter_op_num_threads = 1
                session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                runners["onnxruntime"] = lambda x, s=session: s.run(None, {"images": x})
            else:
                runners[fmt] = load_exported(path, fmt)
        x = images.numpy()
        errors = {}
        for name, run in runners.items():
            errors[name] = max(float(np.abs(a - b).max()) for a, b in zip(reference, run(x)))
            for _ in range(args.warmup):
                run(x)
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.backbone} {args.decoder}, 4 tasks, {args.batch} x 3 x {args.height} x {args.width}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'format':<18}{'export s':>10}{'file MiB':>10}")
    for fmt in FORMATS:
        print(f"{fmt:<18}{export_seconds[fmt]:>10.1f}{sizes[fmt]:>10.1f}")
    print(f"{'runtime':<18}{'ms/forward':>12}{'vs eager':>10}{'max |diff|':>12}")
    for name, seconds in medians.items():
        print(f"{name:<18}{seconds * 1e3:>12.1f}{medians['eager'] / seconds:>9.2f}x{errors[name]:>12.1e}")
    if args.json:
        args.json.write_text(json.dumps({"export_s": export_seconds, "file_mib": sizes, "runtime_s": medians,
                                         "max_abs_diff": errors, "args": vars(args) | {"json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
