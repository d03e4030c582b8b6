"""Reading released checkpoints: the wrappers the releases use, and every bad input refused clearly."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError, check_all_used, read_release_checkpoint
from mtvision.errors import CheckpointError, UnknownNameError

STATE = {"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(2)}


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module", "model+module"])
def test_release_wrappers_are_unwrapped(tmp_path, wrap):
    state = {f"module.{k}": v for k, v in STATE.items()} if "module" in wrap else dict(STATE)
    raw = {"model": state, "optimizer": {"lr": 1}, "epoch": 3} if wrap.startswith("model") else state
    raw = {"state_dict": state, "iter": 40000} if wrap == "state_dict" else raw
    torch.save(raw, tmp_path / "ckpt.pth.tar")
    got = read_release_checkpoint(tmp_path / "ckpt.pth.tar")
    assert got.keys() == STATE.keys() and all(torch.equal(got[k], STATE[k]) for k in STATE)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_with_how_to_resave(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": STATE, "hook": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="re-save its tensors once"):
        read_release_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        read_release_checkpoint(tmp_path / "raw.pkl")
    assert not (tmp_path / "pwned").exists()


def test_truncated_missing_and_empty_files_are_named(tmp_path):
    torch.save(STATE, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or corrupt"):
        read_release_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_release_checkpoint(tmp_path / "absent.pth")
    torch.save({"epoch": 3}, tmp_path / "nothing.pth")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        read_release_checkpoint(tmp_path / "nothing.pth")


def test_unknown_format_and_dataset_and_leftover_keys(tmp_path):
    torch.save(STATE, tmp_path / "ok.pth")
    with pytest.raises(UnknownNameError, match="checkpoint format"):
        convert_checkpoint("inpvt", tmp_path / "ok.pth", "nyud", tmp_path / "out")
    if FORMATS:
        with pytest.raises(ConversionError, match="unknown dataset 'cityscapes'"):
            convert_checkpoint(sorted(FORMATS)[0], tmp_path / "ok.pth", "cityscapes", tmp_path / "out")
    with pytest.raises(ConversionError, match=r"1 checkpoint keys were not mapped, e.g. \['b.bias'\]"):
        check_all_used(STATE, {"a.weight"}, {})
    check_all_used(STATE, {"a.weight"}, {"b.bias": "built but never used by the release"})
