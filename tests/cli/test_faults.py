"""Faults at the edges of a run, as a user or a scheduler causes them: stop signals to the process
group, OS errors, two runs on one folder, failed resumes, command lines, honest reports."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtvision.cli.evaluate import main as eval_main
from mtvision.cli.train import main as train_main
from mtvision.engine.checkpoint import CheckpointManager, load_checkpoint
from tests.cli.test_train_eval_cli import write_config

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, name: str = "tiny.yaml", **changes) -> Path:
    path = Path(write_config(tmp_path, **changes))
    return path.rename(tmp_path / name)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(CheckpointManager(run).latest())["model"]


# ------------------------------------------------------------------------------------ signals
def test_sigterm_to_the_process_group_saves_and_resume_is_bit_identical(tmp_path):
    """What Slurm, Kubernetes and torchrun do: SIGTERM to every process of the job, DataLoader
    workers included. The workers ignore it, the run saves at the end of the step and exits 0."""
    changes = {"data": {"num_workers": 2, "num_samples": {"train": 64, "val": 2, "test": 2}},
               "train": {"iterations": 40, "eval_interval": 40, "seed": 5, "deterministic": True},
               "logging": {"console": "plain", "log_interval": 1, "num_val_images": 0}}
    ref_cfg = _config(tmp_path, "ref.yaml", **changes)
    ref = yaml.safe_load(ref_cfg.read_text())
    ref["output_dir"] = str(tmp_path / "ref")
    ref_cfg.write_text(yaml.safe_dump(ref))
    assert train_main([str(ref_cfg)]) == 0
    cfg = _config(tmp_path, "cut.yaml", **changes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mtvision.cli.train", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out and "DataLoader worker" not in out
    stopped = load_checkpoint(CheckpointManager(tmp_path / "run").latest())["step"]
    assert 3 <= stopped < 40
    assert train_main([str(cfg), "--resume"]) == 0
    want, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_second_signal_while_stopping_force_quits():
    from mtvision.engine.trainer import StopSignal

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt, match="force-quit"):
            os.kill(os.getpid(), signal.SIGINT)


# ------------------------------------------------------------------------------------ OS errors
def test_a_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    target = Path("/sys/kernel/mtvision-run")
    if os.access("/sys/kernel", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys/kernel is writable here")
    cfg = _config(tmp_path)
    assert train_main([str(cfg), f"output_dir={target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write to '/sys/kernel'" in err and "Traceback" not in err


def test_too_little_free_space_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    assert train_main([str(_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "only 1 MiB free" in err and not (tmp_path / "run").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_earlier_checkpoints_survive(tmp_path, capsys, monkeypatch):
    import mtvision.engine.checkpoint as checkpoint_module

    real, calls = checkpoint_module.torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() reports it
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    cfg = _config(tmp_path, train={"iterations": 4, "eval_interval": 2})
    assert train_main([str(cfg)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("train:", "validation:"))]
    assert len(err) == 1 and err[0].startswith("mtv-train: ") and "Traceback" not in err[0]
    assert "No space left on device" in err[0] and "step_000004" in err[0] and "--resume" in err[0]
    assert load_checkpoint(CheckpointManager(tmp_path / "run").latest())["step"] == 2  # intact


# ------------------------------------------------------------------------------------ one run per folder
def test_a_live_run_holds_its_folder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "started": "now"}
        (run / ".lock").write_text(json.dumps(lock))
        for extra in ([], ["--overwrite"]):
            assert train_main([str(cfg), *extra]) == 2
            assert f"in use by process {sleeper.pid}" in capsys.readouterr().err
        assert (run / ".lock").is_file() and json.loads((run / ".lock").read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match=f"stale lock of process {sleeper.pid}"):
        assert train_main([str(cfg)]) == 0
    assert not (run / ".lock").exists()  # released at the end


# ------------------------------------------------------------------------------------ resume and command lines
def test_a_failed_resume_changes_nothing(tmp_path, capsys):
    cfg = _config(tmp_path, train={"iterations": 2, "eval_interval": 2})
    assert train_main([str(cfg)]) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}
    latest = CheckpointManager(run).latest()
    (latest / "state.pt").write_bytes(b"garbage")
    assert train_main([str(cfg), "--resume", "optim.lr=5e-3", "train.iterations=4"]) == 2
    assert "state.pt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")} == before


def test_overrides_may_follow_flags_and_resume_takes_a_checkpoint(tmp_path, capsys):
    cfg = _config(tmp_path, train={"iterations": 4, "eval_interval": 2})
    assert train_main([str(cfg), "--overwrite", "train.iterations=2"]) == 0
    first = CheckpointManager(tmp_path / "run").checkpoints()[0]
    assert train_main([str(cfg), "--resume", str(first), "train.iterations=4"]) == 0
    assert load_checkpoint(CheckpointManager(tmp_path / "run").latest())["step"] == 4
    assert train_main([str(cfg), "--resume", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "run"), "--split", "val", "data.num_workers=0"]) == 0
    with pytest.raises(SystemExit) as usage:  # argparse's usage errors exit 2 too
        train_main(["--no-such-flag"])
    assert usage.value.code == 2


def test_resumed_progress_counts_only_new_steps_in_its_rate(tmp_path, capsys):
    cfg = _config(tmp_path, train={"iterations": 3, "eval_interval": 3}, logging={"console": "plain", "log_interval": 1})
    assert train_main([str(cfg)]) == 0
    capsys.readouterr()
    assert train_main([str(cfg), "--resume", "train.iterations=6", "train.eval_interval=6"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step")]
    rates = [float(line.split(" img/s")[0].rsplit("| ", 1)[-1]) for line in lines if "? img/s" not in line]
    assert rates and max(rates) < 1e4, lines  # a real rate, not 6 steps counted in no time
    assert lines[-1].startswith("train: step 6/6")


# ------------------------------------------------------------------------------------ honest reports
def test_without_a_usable_validation_score_the_report_says_so(tmp_path, capsys, monkeypatch):
    from mtvision.engine.selection import Selector

    monkeypatch.setattr(Selector, "score", lambda self, metrics: float("nan"))
    assert train_main([str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "no validation gave a usable score, so no best checkpoint was chosen" in out
    assert "best validation checkpoint" not in out
