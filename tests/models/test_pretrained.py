"""Pretrained folders: save -> load gives the same model; bad folders fail cleanly without unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtvision.models import CheckpointError, ConfigError, MultiTaskModel, create_model, load_model
from mtvision.models.pretrained import FORMAT_VERSION


def _trained_like(decoder: str) -> MultiTaskModel:
    torch.manual_seed(0)
    model = create_model(
        backbone="test_resnet",
        decoder=decoder,
        tasks={"semseg": 7, "depth": None, "normals": None},
        decoder_options={"neck_channels": 16, "head_channels": 8},
    )
    with torch.no_grad():  # move BN statistics and alphas away from their initial values
        model.train()(torch.randn(4, 3, 32, 32))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("decoder", ["hps", "cross_stitch"])
def test_save_load_gives_identical_outputs(tmp_path, decoder):
    model = _trained_like(decoder)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MultiTaskModel.from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert loaded.task_names == model.task_names
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for t in a:
        assert torch.equal(a[t], b[t]), t


def test_config_json_records_versions_and_drops_weight_paths(tmp_path):
    model = create_model(backbone={"name": "test_resnet", "pretrained": False}, tasks=["depth"])
    model.config.backbone.weights = "/somewhere/resnet.safetensors"
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["format_version"] == FORMAT_VERSION and "mtvision_version" in data
    assert data["backbone"]["weights"] is None and data["backbone"]["pretrained"] is False
    assert data["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_saving_over_a_folder_replaces_it_atomically(tmp_path):
    first, second = _trained_like("hps"), _trained_like("hps")
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    state = load_file(str(tmp_path / "model.safetensors"))
    for k, v in second.state_dict().items():
        assert torch.equal(state[k], v)


@pytest.fixture
def folder(tmp_path):
    model = create_model(backbone="test_resnet", tasks=["depth", "normals"])
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, change):
    data = json.loads((folder / "config.json").read_text())
    change(data)
    (folder / "config.json").write_text(json.dumps(data))


def test_newer_format_version_is_refused(folder):
    _edit_config(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1, mtvision_version="9.0"))
    with pytest.raises(ConfigError, match="upgrade mtvision"):
        load_model(folder)


def test_unknown_config_keys_name_the_closest(folder):
    _edit_config(folder, lambda d: d.update(decodr="hps"))
    with pytest.raises(ConfigError, match="did you mean 'decoder'"):
        load_model(folder)
    _edit_config(folder, lambda d: (d.pop("decodr"), d["preprocess"].update(sizedivisor=8)))
    with pytest.raises(ConfigError, match="did you mean 'preprocess.size_divisor'"):
        load_model(folder)


def test_config_without_version_or_not_json(folder):
    _edit_config(folder, lambda d: d.pop("format_version"))
    with pytest.raises(ConfigError, match="format_version"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(folder)


def test_missing_folder_or_files(tmp_path, folder):
    with pytest.raises(ConfigError, match="not a pretrained folder"):
        load_model(tmp_path / "absent")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(folder)


def test_truncated_weights_fail_cleanly(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(folder)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(folder)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_posing_as_weights_is_never_unpickled(folder, tmp_path):
    marker = tmp_path / "pwned"
    path = folder / "model.safetensors"
    for dump in (
        lambda: torch.save({"x": _Payload(str(marker))}, path),
        lambda: path.write_bytes(pickle.dumps({"x": _Payload(str(marker))})),
    ):
        dump()
        with pytest.raises(CheckpointError, match="will not be unpickled"):
            load_model(folder)
        assert not marker.exists()


def test_weights_that_do_not_fit_the_config(folder):
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("heads.depth.out.weight"))
    renamed = dict(state)
    renamed[key.replace("depth", "dpeth")] = renamed.pop(key)
    save_file(renamed, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load_model(folder)
    reshaped = dict(state)
    reshaped[key] = torch.zeros(2, *state[key].shape[1:])
    save_file(reshaped, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(folder)


def test_hub_repo_ids_go_through_huggingface_hub_only_when_installed(folder, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = lambda repo_id, allow_patterns: calls.append((repo_id, allow_patterns)) or str(folder)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    model = load_model("someone/mtv-model")
    assert model.task_names == ["depth", "normals"]
    assert calls == [("someone/mtv-model", ["config.json", "model.safetensors"])]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ConfigError, match="needs huggingface_hub"):
        load_model("someone/mtv-model")


def test_backbone_kwargs_survive_the_folder(tmp_path):
    swin = {
        "name": "swin_tiny_patch4_window7_224",
        "kwargs": {
            "img_size": 64,
            "depths": (1, 1, 1, 1),
            "embed_dim": 16,
            "num_heads": (1, 1, 2, 2),
            "window_size": 4,
            "dynamic_img_size": True,
        },
    }
    torch.manual_seed(0)
    model = create_model(backbone=swin, decoder="cross_stitch", tasks=["normals", "edge"]).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.backbone.kwargs["depths"] == [1, 1, 1, 1]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.equal(a[t], b[t]) for t in a)
