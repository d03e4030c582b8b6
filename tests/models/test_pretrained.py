"""Pretrained folders: save -> load gives the same model; saving is atomic; bad folders fail cleanly
without unpickling; the model modules import each other one way only."""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import mtvision.models
from mtvision import atomic, errors
from mtvision.engine import checkpoint
from mtvision.models import CheckpointError, ConfigError, MultiTaskModel, create_model, load_model, pretrained, saving
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
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.task_names == model.task_names
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        a, b = model(x).predictions, loaded(x).predictions
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
    target = tmp_path / "m"
    first.save_pretrained(target)
    target.chmod(0o750)
    second.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or set-aside folders left
    assert target.stat().st_mode & 0o777 == 0o750  # the replaced folder's permissions carry over
    state = load_file(str(target / "model.safetensors"))
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


@pytest.mark.parametrize("name", ["hf-hub:someone/mtv-model", "someone/mtv-model", "hf-hub:someone/mtv-model@main"])
def test_hub_models_load_from_the_hub_cache(folder, tmp_path, monkeypatch, name):
    from tests.hub_cache import populate, use_cache

    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache, offline=True)
    populate(cache, "someone/mtv-model", {f: folder / f for f in ("config.json", "model.safetensors")})
    model = load_model(name)
    want = load_model(folder)
    assert model.task_names == ["depth", "normals"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x).predictions, want(x).predictions
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_offline_uncached_hub_model_is_one_clear_error(tmp_path, monkeypatch):
    from tests.hub_cache import use_cache

    use_cache(monkeypatch, tmp_path / "empty", offline=True)
    with pytest.raises(ConfigError) as info:
        load_model("hf-hub:someone/absent")
    message = str(info.value)
    assert "'someone/absent'" in message and "HF_HUB_OFFLINE" in message and str(tmp_path / "empty") in message
    assert "local pretrained folder" in message
    with pytest.raises(ConfigError, match="not a hub repo id"):
        load_model("hf-hub:no-slash")


def test_hub_needs_huggingface_hub(monkeypatch):
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
        a, b = model(x).predictions, loaded(x).predictions
    assert all(torch.equal(a[t], b[t]) for t in a)


# ---------------------------------------------------------------------------------------------- atomic folders


def _tiny():
    return create_model(backbone="test_resnet", tasks=["depth"])


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_folder_files_get_normal_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        _tiny().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~mask
    if mask == 0o022:
        assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def _full_disk(*args, **kwargs):
    path = Path(args[1])
    path.write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["config.json", "model.safetensors"])
def test_failed_save_leaves_the_previous_folder(tmp_path, monkeypatch, failing):
    target = tmp_path / "m"
    _tiny().save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    if failing == "config.json":
        monkeypatch.setattr(atomic, "_open_new", lambda path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    second = _tiny()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    with pytest.raises(OSError) as info:
        second.save_pretrained(target)
    assert info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the temporary folder is gone
    monkeypatch.undo()
    load_model(target)  # still a complete folder


def test_saving_never_deletes_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt.*choose a new or empty folder"):
        _tiny().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        _tiny().save_pretrained(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _tiny().save_pretrained(empty)  # an empty folder is fine
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    _tiny().save_pretrained(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    _tiny().save_pretrained(link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert load_model(link).task_names == ["depth"]


def _stub_uploads(monkeypatch, tmp_path):
    """HfApi.create_repo / upload_folder replaced by a copy of the uploaded folder under tmp_path/uploaded."""
    import shutil

    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, tmp_path / "uploaded" / repo_id)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_folder_and_model_card_that_load_back(monkeypatch, tmp_path):
    from tests.hub_cache import populate, use_cache

    calls = _stub_uploads(monkeypatch, tmp_path)
    metrics = tmp_path / "metrics_val.json"
    metrics.write_text(json.dumps({
        "split": "val", "target": "runs/x", "command": "mtv-eval runs/x --split val",
        "metrics": {"depth": {"rmse": 0.5123, "abs_rel": 0.1234}},
    }))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  dataset: synthetic\n")
    model = _tiny()
    url = model.push_to_hub("someone/m", commit_message="c", metrics=metrics, data="synthetic scenes", config=recipe)
    assert url == "https://huggingface.co/someone/m"
    assert calls == [("create_repo", "someone/m", True, True), ("upload_folder", "someone/m", "c")]
    uploaded = tmp_path / "uploaded" / "someone" / "m"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mtvision\nlicense: apache-2.0\n")
    for text in ("| depth | rmse | 0.5123 |", "mtv-eval runs/x --split val", "`val` split", "synthetic scenes",
                 'mtvision.load("hf-hub:someone/m")', "dataset: synthetic", '"decoder": "hps"', "| depth | depth in metres"):
        assert text in card, text
    # the uploaded folder is what the hub serves: load it back through the cache
    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache, offline=True)
    populate(cache, "someone/m", {p.name: p for p in uploaded.iterdir()})
    loaded = load_model("hf-hub:someone/m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).predictions["depth"], model.eval()(x).predictions["depth"])


def test_push_to_hub_needs_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(errors.MTVisionError, match="needs huggingface_hub"):
        _tiny().push_to_hub("someone/m")


def test_a_model_card_in_the_folder_survives_a_new_save(tmp_path):
    saving.save_pretrained(_tiny(), tmp_path / "m", model_card="# mine\n")
    _tiny().save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "# mine\n"
    assert sorted(saving.FOLDER_FILES) == ["README.md", "config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------- module structure


def _imported_modules(module) -> set[str]:
    """Every module `module`'s source imports, at top level or inside functions (relative imports resolved)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    package = module.__name__.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_model_modules_import_each_other_one_way_only():
    from mtvision.models import multitask

    loaders = {"mtvision.models.pretrained", "mtvision.models.registry"}
    assert not _imported_modules(multitask) & loaders
    assert not _imported_modules(saving) & (loaders | {"mtvision.models.multitask"})
    assert not hasattr(MultiTaskModel, "from_pretrained")  # loading goes through mtvision.load / load_model
    assert pretrained.save_pretrained is saving.save_pretrained and pretrained.push_to_hub is saving.push_to_hub


def test_there_is_one_checkpoint_error():
    assert CheckpointError is errors.CheckpointError is checkpoint.CheckpointError is pretrained.CheckpointError
    assert mtvision.models.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, errors.MTVisionError) and issubclass(CheckpointError, ValueError)
