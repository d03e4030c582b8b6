"""Tests of atomic writes, torch.save checkpoints loaded with weights_only, RNG capture and the rotating manager."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from collections import OrderedDict, namedtuple
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
    DATA_FILE,
    MANIFEST_FILE,
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


def full_disk_after(monkeypatch, budget: int, only: str | None = None) -> None:
    """Every new file (or only those named `only`) fails with ENOSPC after `budget` bytes."""
    real = atomic._open_new

    def opener(path):
        fh = real(path)
        return Budget(fh, budget) if only is None or Path(path).name == only else fh

    monkeypatch.setattr(atomic, "_open_new", opener)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


# ---------------------------------------------------------------------------------------------- format


def rich_state() -> dict:
    model = nn.BatchNorm2d(3).state_dict()  # an OrderedDict with `_metadata`, as every state_dict()
    model.update(
        [
            ("backbone.conv.weight", torch.randn(4, 3, 3, 3)),
            ("half", torch.randn(5).to(torch.bfloat16)),
            ("mask", torch.tensor([True, False, True])),
            ("strided", torch.arange(12.0).reshape(3, 4).t()),
            ("empty", torch.zeros(0, 3)),
            ("u8", torch.arange(7, dtype=torch.uint8)),
        ]
    )
    return {
        "model": model,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}, 1: {"exp_avg": torch.randn(2, dtype=torch.float64)}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
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
        "odd_keys": {1.5: "f", None: "n", True: "b", (1, "a"): "t", np.int64(4): "np"},
        "tag_like": {"__tuple__": [1, 2]},
        "nested_tuple": ((1, 2), [3, (4,)]),
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},
    }


def test_round_trip_keeps_types_and_values(tmp_path):
    state = rich_state()
    path = save_checkpoint(tmp_path / "ck", state)
    assert listing(path) == [MANIFEST_FILE, DATA_FILE]
    loaded = load_checkpoint(path)
    expected = dict(state)
    expected["metrics"] = {**state["metrics"], "np": 2.5}  # numpy scalars become Python numbers
    expected["odd_keys"] = {**{k: v for k, v in state["odd_keys"].items() if v != "np"}, 4: "np"}
    assert_same(loaded, expected)
    assert type(loaded["model"]) is OrderedDict and loaded["model"]._metadata == state["model"]._metadata
    assert type(loaded["metrics"]["np"]) is float and type(next(reversed(loaded["odd_keys"]))) is int
    assert loaded["model"]["strided"].stride() == (1, 4)  # stored as it was, not made contiguous


def test_state_file_is_a_standard_torch_archive_that_loads_with_weights_only(tmp_path):
    state = rich_state()
    path = save_checkpoint(tmp_path / "ck", state)
    direct = torch.load(path / DATA_FILE, weights_only=True)
    assert_same(direct, load_checkpoint(path))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == "mtvision-checkpoint" and manifest["version"] == ckpt.VERSION == 2
    assert manifest["data"]["file"] == DATA_FILE
    assert manifest["data"]["bytes"] == (path / DATA_FILE).stat().st_size
    assert manifest["data"]["sha256"] == ckpt._file_digest(path / DATA_FILE)
    assert {"mtvision_version", "torch_version"} <= set(manifest)


def test_views_are_stored_without_their_whole_storage(tmp_path):
    big = torch.arange(1_000_000.0)
    path = save_checkpoint(tmp_path / "ck", {"view": big[10:20], "param": nn.Parameter(torch.ones(3))})
    assert (path / DATA_FILE).stat().st_size < 100_000  # the 4 MB storage behind the view is not written
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["view"], big[10:20])
    assert type(loaded["param"]) is torch.Tensor and not loaded["param"].requires_grad


def test_unstorable_objects_are_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot store a \w*Path at 'config\.root'"):
        save_checkpoint(tmp_path / "ck", {"config": {"root": Path("/x")}})
    with pytest.raises(CheckpointError, match=r"cannot store a numpy array at 'names'.*torch\.from_numpy"):
        save_checkpoint(tmp_path / "ck", {"names": np.array(["a", "b"])})
    with pytest.raises(CheckpointError, match=r"cannot store a numpy array at 'rng\.key'"):
        save_checkpoint(tmp_path / "ck", {"rng": {"key": np.arange(3, dtype=np.uint32)}})
    with pytest.raises(CheckpointError, match="dict key"):
        save_checkpoint(tmp_path / "ck", {"x": {object(): 1}})
    with pytest.raises(CheckpointError, match=r"cannot store a Point at 'p'"):
        save_checkpoint(tmp_path / "ck", {"p": namedtuple("Point", "x y")(1, 2)})
    with pytest.raises(CheckpointError, match=r"cannot store a set at 'f\.1'"):
        save_checkpoint(tmp_path / "ck", {"f": [0, {1}]})
    with pytest.raises(CheckpointError, match=r"cannot store a dtype at 'dtype'"):
        save_checkpoint(tmp_path / "ck", {"dtype": torch.float16})
    assert listing(tmp_path) == []


def test_load_to_other_device_name(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)})
    for target in (tmp_path / "ck" / MANIFEST_FILE, tmp_path / "ck" / DATA_FILE):
        loaded = load_checkpoint(target, map_location=torch.device("cpu"))
        assert torch.equal(loaded["w"], torch.ones(2)) and loaded["w"].device.type == "cpu"


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
    json.dumps({"python": state["python"], "numpy": state["numpy"]})  # plain values, no numpy objects
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    save_checkpoint(tmp_path / "ck", {"rng": state})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restore_rng_state(load_checkpoint(tmp_path / "ck")["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        restore_rng_state({"python": state["python"]})


def test_rng_state_holds_only_types_weights_only_loading_accepts(tmp_path):
    np.random.standard_normal()
    state = capture_rng_state()

    def leaves(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from leaves(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    assert {type(v) for v in leaves(state)} <= {int, float, str, type(None), torch.Tensor}
    torch.save({"rng": state}, tmp_path / "rng.pt")
    assert_same(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], state)


# ---------------------------------------------------------------------------------------------- corruption


def test_truncated_or_damaged_files_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.arange(1000.0), "step": 1})
    state_file = path / DATA_FILE
    data = state_file.read_bytes()

    state_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"truncated.*{DATA_FILE}.*delete the folder {path}"):
        load_checkpoint(path)

    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=f"damaged or modified checkpoint file .*{DATA_FILE}: SHA-256"):
        load_checkpoint(path)

    state_file.write_bytes(data)
    manifest_text = (path / MANIFEST_FILE).read_text()
    (path / MANIFEST_FILE).write_text(manifest_text[: len(manifest_text) // 2])
    with pytest.raises(CheckpointError, match=f"corrupt or truncated checkpoint file .*{MANIFEST_FILE}"):
        load_checkpoint(path)

    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: .*{MANIFEST_FILE} is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing")
    assert issubclass(CheckpointError, MTVisionError)


def test_missing_state_file_is_incomplete(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"step": 1})
    (path / DATA_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: .*{DATA_FILE} is missing"):
        load_checkpoint(path)


def test_archive_corruption_caught_by_torch_without_verify(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.arange(10.0)})
    data = bytearray((path / DATA_FILE).read_bytes())
    data[-22:] = b"\x00" * 22  # wipe the zip's end-of-central-directory record, keep the size
    (path / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file .*{DATA_FILE}.*delete the folder"):
        load_checkpoint(path, verify=False)


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"step": 1})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _valid_manifest_for(state_file: Path) -> None:
    """Pair `state_file` with a manifest that matches it (an attacker who can write both files)."""
    info = {"file": DATA_FILE, "bytes": state_file.stat().st_size, "sha256": ckpt._file_digest(state_file)}
    manifest = {"format": "mtvision-checkpoint", "version": ckpt.VERSION, "data": info}
    (state_file.parent / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["model.pt", MANIFEST_FILE, DATA_FILE, ckpt.LEGACY_TENSORS_FILE])
def test_pickle_posing_as_checkpoint_is_not_executed(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": Exploit(marker)})
    pickle_path = tmp_path / "ck" / name
    pickle_path.parent.mkdir()
    pickle_path.write_bytes(payload)
    if name == DATA_FILE:
        _valid_manifest_for(pickle_path)
    for target in (pickle_path, pickle_path.parent):
        with pytest.raises(CheckpointError):
            load_checkpoint(target)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loading it *would* have created the marker
    assert marker.exists()


def test_torch_archive_with_an_object_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(1)}, "hook": Exploit(marker)}, folder / DATA_FILE)  # a real zip archive
    _valid_manifest_for(folder / DATA_FILE)
    with pytest.raises(CheckpointError, match=r"refused to load .*state\.pt.*weights_only=True.*ran none of it"):
        load_checkpoint(folder)
    assert not marker.exists()
    torch.load(folder / DATA_FILE, weights_only=False)  # the archive is live: unrestricted loading runs it
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- old format


def write_old_format_checkpoint(folder: Path) -> None:
    """A checkpoint folder as earlier development versions wrote it (format 1)."""
    folder.mkdir(parents=True)
    safetensors.torch.save_file({"model.w": torch.ones(2)}, str(folder / ckpt.LEGACY_TENSORS_FILE))
    info = {"file": ckpt.LEGACY_TENSORS_FILE, "bytes": (folder / ckpt.LEGACY_TENSORS_FILE).stat().st_size}
    state = {"model": {"w": {"__tensor__": "model.w"}}, "step": 4}
    manifest = {"format": "mtvision-checkpoint", "version": 1, "tensors": {**info, "sha256": "0" * 64}, "state": state}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_old_format_checkpoint_gets_a_clear_error(tmp_path):
    run = tmp_path / "run"
    old = run / "checkpoints" / "step_000004"
    write_old_format_checkpoint(old)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(old)
    message = str(info.value)
    assert str(old) in message and "pre-0.1 format" in message and "older mtvision" in message
    assert f"mtvision.load({str(run / 'model')!r})" in message
    assert "start a new run" in message and "older mtvision that wrote it" in message
    assert CheckpointManager(run).latest() == old  # --resume finds it and reports the same error

    shutil.rmtree(run / "model")  # an interrupted run: no pretrained folder yet
    with pytest.raises(CheckpointError, match=r"pre-0\.1 format.*<output_dir>/model/.*mtvision\.load"):
        load_checkpoint(old / ckpt.LEGACY_TENSORS_FILE)
    (old / MANIFEST_FILE).unlink()  # an old folder whose save was interrupted is recognised as well
    with pytest.raises(CheckpointError, match="pre-0.1 format"):
        load_checkpoint(old)


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


@pytest.mark.parametrize("failing", [DATA_FILE, MANIFEST_FILE])
def test_manager_survives_a_full_disk_mid_save(tmp_path, monkeypatch, failing):
    manager = CheckpointManager(tmp_path, keep_last=1)
    good = {"step": 1, "w": torch.arange(4096.0)}
    manager.save(good, 1, is_best=True)
    before = listing(tmp_path / "checkpoints")

    full_disk_after(monkeypatch, 100, only=failing)  # fails inside that file of the next save
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
    (manager.path_for(3) / MANIFEST_FILE).unlink()  # an incomplete folder is never offered
    assert manager.latest() == manager.path_for(2)


def test_deleting_a_damaged_checkpoint_as_told_makes_latest_fall_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save({"step": step, "w": torch.full((100,), float(step))}, step, is_best=step == 3)
    newest = manager.latest()
    assert newest == manager.path_for(3)
    data = (newest / DATA_FILE).read_bytes()
    (newest / DATA_FILE).write_bytes(data[:-10])  # e.g. a copy cut short
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(manager.latest())
    message = str(info.value)
    assert f"delete the folder {newest}" in message and "--resume falls back to the previous checkpoint" in message
    shutil.rmtree(newest)  # what the message says to do
    assert manager.latest() == manager.path_for(2) and manager.best() is None
    assert load_checkpoint(manager.latest())["step"] == 2
    manager.save({"step": 4}, 4)  # the run goes on from there
    assert [p.name for p in manager.checkpoints()] == ["step_000001", "step_000002", "step_000004"]


def test_manager_cleans_leftovers_of_crashed_saves(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1}, 1)
    root = tmp_path / "checkpoints"
    leftover = root / ".step_000002.0123456789ab.tmp"
    leftover.mkdir()
    (leftover / DATA_FILE).write_bytes(b"partial")
    aside = root / ".step_000001.0123456789ab.old"
    aside.mkdir()
    stray = root / ".last.json.0123456789ab.tmp"
    stray.write_text("{")
    manager.save({"step": 2}, 2)
    assert not leftover.exists() and not stray.exists() and not aside.exists()
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_checkpoint_folder_permissions_follow_umask(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"step": 1})
    mask = umask()
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in (MANIFEST_FILE, DATA_FILE):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
