"""Fault soak: short runs killed at a random moment by a random one of SIGTERM to the PID, SIGTERM
to the process group, SIGINT and SIGKILL, then resumed until done; every run must end with weights
bit-identical to an uninterrupted reference run.

    .venv/bin/python benchmarks/bench_fault_soak.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtvision.engine.checkpoint import CheckpointManager, load_checkpoint  # noqa: E402

CONFIG = {
    "data": {"dataset": "synthetic", "tasks": ["semseg", "depth", "normals", "edge"], "height": 32, "width": 40,
             "num_samples": {"train": 64, "val": 4, "test": 4}, "num_workers": 2},
    "model": {"backbone": {"name": "test_resnet"}, "decoder": "hps"},
    "optim": {"lr": 1e-3, "warmup_iters": 2},
    "train": {"iterations": 30, "batch_size": 4, "eval_interval": 5, "seed": 3, "deterministic": True},
    "logging": {"console": "plain", "log_interval": 1, "num_val_images": 0},
}
FAULTS = ("sigterm_pid", "sigterm_group", "sigint", "sigkill")


def run_cmd(cfg: Path, resume: bool, overwrite: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mtvision.cli.train", str(cfg)] + (["--resume"] if resume else [])
    cmd += ["--overwrite"] if overwrite else []
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def write(tmp: Path, name: str) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["output_dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(CheckpointManager(run).latest())["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts = {f: 0 for f in FAULTS}
    survived = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ref = run_cmd(write(tmp, "ref"), resume=False)
        assert ref.wait() == 0, "the reference run failed"
        want = weights(tmp / "ref")
        for i in range(args.runs):
            cfg = write(tmp, f"run{i}")
            proc = run_cmd(cfg, resume=False)
            time.sleep(rng.uniform(4.0, 12.0))  # start-up is a few seconds; the run lasts about 10 more
            fault = rng.choice(FAULTS)
            counts[fault] += 1
            if proc.poll() is None:
                if fault == "sigterm_pid":
                    proc.send_signal(signal.SIGTERM)
                elif fault == "sigterm_group":
                    os.killpg(proc.pid, signal.SIGTERM)
                elif fault == "sigint":
                    proc.send_signal(signal.SIGINT)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            resumes = 0
            while not (tmp / f"run{i}" / "model" / "config.json").is_file():
                # killed before its first checkpoint: nothing to resume, start over
                has_ckpt = CheckpointManager(tmp / f"run{i}").latest() is not None
                code = run_cmd(cfg, resume=has_ckpt, overwrite=not has_ckpt).wait()
                resumes += 1
                if resumes > 3:
                    break
            got = weights(tmp / f"run{i}")
            same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
            survived += same
            print(f"run {i:2d}: {fault:14s} exit {code} resumes {resumes} bit-identical {same}", flush=True)
    print(json.dumps({"runs": args.runs, "faults": counts, "bit_identical": survived}))


if __name__ == "__main__":
    main()
