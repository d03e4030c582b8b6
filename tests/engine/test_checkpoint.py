"""Tests of atomic writes, pickle-free checkpoints, RNG capture and the rotating checkpoint manager."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from mtvision import atomic
from mtvision.atomic import atomic_write, atomic_write_bytes
from mtvision.engine import checkpoint as ckpt
from mtvision.engine.checkpoint import (
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mtvision.errors import MTVisionError


def assert_same(a, b, where="state"):
    """Deep equality that also checks container and scalar types and tensor dtype/values bit-exactly."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


class Budget:
    """A writable file that raises ENOSPC once `budget` bytes have been written (a full disk)."""

    def __init__(self, fh, budget: int) -> None:
        self.fh, self.budget = fh, budget

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.budget:
            self.fh.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def full_disk_after(monkeypatch, budget: int) -> None:
    real = atomic._open_new
    monkeypatch.setattr(atomic, "_open_new", lambda path: Budget(real(path), budget))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write(target, lambda fh: fh.write(b"two"))
    assert target.read_bytes() == b"two"
    assert listing(target.parent) == ["f.bin"]


def test_atomic_write_keeps_old_file_on_full_disk(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")

    def write_fn(fh):
        fh.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(target, write_fn)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["f.bin"]


def test_atomic_write_keeps_old_file_on_any_exception(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    full_disk_after(monkeypatch, 3)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"much more than three bytes")
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["f.bin"]


# ---------------------------------------------------------------------------------------------- encoding


def rich_state() -> dict:
    return {
        "model": OrderedDict(
            [
                ("backbone.conv.weight", torch.randn(4, 3, 3, 3)),
                ("backbone.bn.num_batches_tracked", torch.tensor(7)),
                ("half", torch.randn(5).to(torch.bfloat16)),
                ("mask", torch.tensor([True, False, True])),
                ("strided", torch.arange(12.0).reshape(3, 4).t()),
                ("empty", torch.zeros(0, 3)),
            ]
        ),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0]}],
        },
        "scheduler": None,
        "scaler": {},
        "epoch": 2,
        "step": 123,
        "big": 2**70,
        "sampler": {"epoch": 2, "position": 48},
        "config": {"optim": {"lr": 1e-3}, "data": {"tasks": ["semseg", "depth"]}},
        "metrics": {"semseg.mIoU": 41.5, "bad": float("nan"), "inf": float("-inf"), "np": np.float64(2.5)},
        "best": {"metric": "delta_m", "value": -1.25, "step": 100},
        "odd_keys": {1.5: "f", None: "n", True: "b", (1, "a"): "t"},
        "tag_like": {"__tuple__": [1, 2]},
        "nested_tuple": ((1, 2), [3, (4,)]),
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},
    }


def test_round_trip_keeps_types_and_values(tmp_path):
    state = rich_state()
    path = save_checkpoint(tmp_path / "ck", state)
    assert listing(path) == [STATE_FILE, TENSORS_FILE]
    loaded = load_checkpoint(path)
    expected = dict(state)
    expected["model"] = dict(state["model"])  # OrderedDict is stored as a dict
    expected["metrics"] = {**state["metrics"], "np": 2.5}  # numpy scalars become Python numbers
    assert_same(loaded, expected)
    assert loaded["model"]["strided"].is_contiguous()


def test_tensor_file_is_standard_safetensors_with_dotted_keys(tmp_path):
    path = save_checkpoint(tmp_path / "ck", rich_state())
    tensors = safetensors.torch.load_file(path / TENSORS_FILE)
    assert "model.backbone.conv.weight" in tensors and "optimizer.state.0.step" in tensors
    assert "a.b" in tensors and "a.b#1" in tensors  # clashing dotted paths get distinct keys
    manifest = json.loads((path / STATE_FILE).read_text())
    assert manifest["state"]["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}


def test_unstorable_objects_are_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot store a \w*Path at 'config\.root'"):
        save_checkpoint(tmp_path / "ck", {"config": {"root": Path("/x")}})
    with pytest.raises(CheckpointError, match=r"numpy array of dtype <U1 at 'names'"):
        save_checkpoint(tmp_path / "ck", {"names": np.array(["a", "b"])})
    with pytest.raises(CheckpointError, match="dict key"):
        save_checkpoint(tmp_path / "ck", {"x": {object(): 1}})
    assert listing(tmp_path) == []


def test_load_to_other_device_name(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)})
    loaded = load_checkpoint(tmp_path / "ck" / STATE_FILE, map_location=torch.device("cpu"))
    assert torch.equal(loaded["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------- exact resume


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).relu().mean((2, 3))))


def make_run():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.9**i)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return model, opt, sched, scaler


def train_steps(model, opt, sched, scaler, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(4, 3, 8, 8) * (1 + random.random()) + float(np.random.rand())
        loss = model(x).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, opt, sched, scaler = make_run()
    train_steps(model, opt, sched, scaler, 3)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "weighting": None,
        "calibrator": None,
        "rng": capture_rng_state(),
        "epoch": 0,
        "step": 3,
    }
    save_checkpoint(tmp_path / "ck", state)
    reference = train_steps(model, opt, sched, scaler, 3)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble everything
    loaded = load_checkpoint(tmp_path / "ck")
    assert type(loaded["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert set(loaded["optimizer"]["state"]) == set(range(len(list(model.parameters()))))
    assert loaded["optimizer"]["state"][0]["step"].dtype == torch.float32
    model2, opt2, sched2, scaler2 = make_run()
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    scaler2.load_state_dict(loaded["scaler"])
    restore_rng_state(loaded["rng"])
    resumed = train_steps(model2, opt2, sched2, scaler2, 3)

    assert resumed == reference
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert_same(opt2.state_dict(), opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.state_dict() == scaler.state_dict() and scaler.get_scale() > 2.0**8  # growth tracked


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = capture_rng_state()
    json.dumps({"python": state["python"], "numpy": state["numpy"]})  # JSON-able
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    save_checkpoint(tmp_path / "ck", {"rng": state})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restore_rng_state(load_checkpoint(tmp_path / "ck")["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        restore_rng_state({"python": state["python"]})


# ---------------------------------------------------------------------------------------------- corruption


def test_truncated_or_damaged_files_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.arange(1000.0), "step": 1})
    tensors = path / TENSORS_FILE
    data = tensors.read_bytes()

    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"truncated.*{TENSORS_FILE}"):
        load_checkpoint(path)

    damaged = bytearray(data)
    damaged[-5] ^= 0xFF
    tensors.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=f"damaged checkpoint file .*{TENSORS_FILE}: SHA-256"):
        load_checkpoint(path)

    tensors.write_bytes(data)
    state_text = (path / STATE_FILE).read_text()
    (path / STATE_FILE).write_text(state_text[: len(state_text) // 2])
    with pytest.raises(CheckpointError, match=f"corrupt or truncated checkpoint file .*{STATE_FILE}"):
        load_checkpoint(path)

    (path / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: .*{STATE_FILE} is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing")
    assert issubclass(CheckpointError, MTVisionError)


def test_header_corruption_caught_by_safetensors_without_verify(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.arange(10.0)})
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"  # break the JSON header, keep the size
    (path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file .*{TENSORS_FILE}"):
        load_checkpoint(path, verify=False)


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"step": 1})
    manifest = json.loads((path / STATE_FILE).read_text())
    manifest["version"] = 99
    (path / STATE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.pt", STATE_FILE, TENSORS_FILE])
def test_pickle_posing_as_checkpoint_is_not_executed(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": Exploit(marker)})
    pickle_path = tmp_path / "ck" / name
    pickle_path.parent.mkdir()
    pickle_path.write_bytes(payload)
    if name == TENSORS_FILE:  # pair the pickle with a valid manifest
        manifest = {"format": "mtvision-checkpoint", "version": 1, "state": {}}
        manifest["tensors"] = {"file": TENSORS_FILE, "bytes": len(payload), "sha256": ckpt._file_digest(pickle_path)}
        (pickle_path.parent / STATE_FILE).write_text(json.dumps(manifest))
    for target in (pickle_path, pickle_path.parent):
        with pytest.raises(CheckpointError):
            load_checkpoint(target)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loading it *would* have created the marker
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- manager


def test_manager_rotates_and_keeps_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.best() is None
    for step, best in [(10, True), (20, False), (30, False), (40, False)]:
        path = manager.save({"step": step, "w": torch.full((2,), float(step))}, step, is_best=best)
        assert path == tmp_path / "checkpoints" / f"step_{step:06d}"
    assert [p.name for p in manager.checkpoints()] == ["step_000010", "step_000030", "step_000040"]
    assert manager.latest() == manager.path_for(40) and manager.best() == manager.path_for(10)
    assert load_checkpoint(manager.best())["step"] == 10
    manager.save({"step": 50}, 50, is_best=True)  # the old best may now be pruned
    assert [p.name for p in manager.checkpoints()] == ["step_000040", "step_000050"]
    assert manager.best() == manager.latest() == manager.path_for(50)
    assert listing(tmp_path / "checkpoints") == ["best.json", "last.json", "step_000040", "step_000050"]


def test_manager_survives_a_full_disk_mid_save(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    good = {"step": 1, "w": torch.arange(4096.0)}
    manager.save(good, 1, is_best=True)
    before = listing(tmp_path / "checkpoints")

    full_disk_after(monkeypatch, 5000)  # fails inside the tensor file of the next save
    with pytest.raises(OSError) as info:
        manager.save({"step": 2, "w": torch.arange(4096.0) + 1}, 2)
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path / "checkpoints") == before  # no partial folder, no temporary files
    assert manager.latest() == manager.path_for(1) == manager.best()
    assert_same(load_checkpoint(manager.latest()), good)

    monkeypatch.undo()
    manager.save({"step": 2}, 2)
    assert manager.latest() == manager.path_for(2) and manager.best() == manager.path_for(1)


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"v": 1}, 5)
    manager.save({"v": 2}, 5)
    assert load_checkpoint(manager.latest()) == {"v": 2}
    assert listing(tmp_path / "checkpoints") == ["last.json", "step_000005"]


def test_latest_falls_back_when_pointer_is_bad(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save({"step": step}, step)
    root = tmp_path / "checkpoints"
    (root / "last.json").write_text("{not json")
    assert manager.latest() == manager.path_for(3)
    (root / "last.json").write_text(json.dumps({"path": "../../etc", "step": 0}))
    assert manager.latest() == manager.path_for(3)
    (manager.path_for(3) / STATE_FILE).unlink()  # an incomplete folder is never offered
    assert manager.latest() == manager.path_for(2)


def test_manager_cleans_leftovers_of_crashed_saves(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1}, 1)
    root = tmp_path / "checkpoints"
    leftover = root / ".step_000002.0123456789ab.tmp"
    leftover.mkdir()
    (leftover / TENSORS_FILE).write_bytes(b"partial")
    stray = root / ".last.json.0123456789ab.tmp"
    stray.write_text("{")
    manager.save({"step": 2}, 2)
    assert not leftover.exists() and not stray.exists()
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_checkpoint_folder_permissions_follow_umask(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"step": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (path / STATE_FILE).stat().st_mode & 0o777 == 0o666 & ~umask
