"""PAD-Net release -> mtvision: the key mapping pinned by the release's manifests (keys and shapes of
the authors' models, tests/convert/manifests/padnet_{nyud,pascal}.json), the parameter counts, and
bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
max |diff| = 0 for every task's final and initial predictions, both datasets."""

from __future__ import annotations

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError
from mtvision.models.pretrained import load_model
from mtvision.models.registry import build_model
from tests.convert.release_state import load_manifest, release_state

TASKS = {"nyud": ["semseg", "depth"], "pascal": ["semseg", "parts", "saliency", "normals", "edge"]}






@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_release_maps_exactly_onto_the_model(dataset):
    manifest = load_manifest(f"padnet_{dataset}")
    conversion = FORMATS["padnet"](release_state(manifest), dataset, None, None)
    config = conversion.config
    b = config.backbone
    assert (b.name, b.kwargs, b.upsample_mode, b.bn_momentum) == ("hrnet_w18_small_v2", {"feature_location": ""}, "bilinear", 0.01)
    assert list(config.tasks) == TASKS[dataset]  # the release's order, mtvision's names
    assert config.decoder == "padnet" and config.decoder_options == {"head_channels": 256, "neck_channels": None}
    assert (config.preprocess.mode, config.preprocess.input_size) == ("stretch", [480, 640] if dataset == "nyud" else [512, 512])
    assert conversion.skipped == {}  # the release uses every parameter
    with torch.device("meta"):
        model = build_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    model.load_state_dict(conversion.state_dict, strict=True, assign=True)
    # the release: 7,019,056 (NYUD) / 29,304,992 (PASCAL) parameters
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]


def test_a_dataparallel_checkpoint_converts_loads_and_runs(tmp_path):
    state = release_state(load_manifest("padnet_nyud"), device="cpu")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 99}, tmp_path / "checkpoint.pth.tar")
    out = convert_checkpoint("padnet", tmp_path / "checkpoint.pth.tar", "nyud", tmp_path / "folder")
    model = load_model(out).eval()
    own = model.state_dict()
    assert torch.equal(own["decoder.distillation.messages.semseg.depth.attention.weight"],
                       state["multi_modal_distillation.self_attention.semseg.depth.attention.0.weight"])
    assert torch.equal(own["decoder.backbone.body.stage4.1.fuse_layers.0.3.0.weight"], state["backbone.0.stage4.1.fuse_layers.0.3.0.weight"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96)).predictions
    assert out["semseg"].shape == (1, 40, 64, 96) and torch.isfinite(out["depth"]).all()


def test_bad_checkpoints_are_refused_with_the_reason():
    nyud, pascal = release_state(load_manifest("padnet_nyud")), release_state(load_manifest("padnet_pascal"))
    with pytest.raises(ConversionError, match="not the pascal release's"):
        FORMATS["padnet"](nyud, "pascal", None, None)
    with pytest.raises(ConversionError, match="not a PAD-Net checkpoint"):
        FORMATS["padnet"](release_state(load_manifest("mtinet_nyud")), "nyud", None, None)
    odd = dict(nyud)
    odd["backbone.0.transition1.0.0.weight"] = torch.empty(20, 256, 3, 3, device="meta")
    with pytest.raises(ConversionError, match="first branch width 20.*fits no timm HRNet"):
        FORMATS["padnet"](odd, "nyud", None, None)
    with pytest.raises(ConversionError, match="does not fit timm 'hrnet_w18'"):
        FORMATS["padnet"](nyud, "nyud", None, "hrnet_w18")
    aux = dict(nyud)  # pad_net+edges_normals: normals and edges as auxiliary-only tasks
    aux["initial_task_prediction_heads.conv_out.normals.weight"] = torch.empty(3, 256, 1, 1, device="meta")
    with pytest.raises(ConversionError, match="auxiliary-only tasks"):
        FORMATS["padnet"](aux, "nyud", None, None)
    extra = dict(pascal)
    extra["multi_modal_distillation.extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ConversionError, match="1 checkpoint keys were not mapped"):
        FORMATS["padnet"](extra, "pascal", None, None)
