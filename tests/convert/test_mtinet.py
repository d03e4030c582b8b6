"""MTI-Net release -> mtvision: the key mapping pinned by the release's manifests (keys and shapes of
the authors' models, tests/convert/manifests/mtinet_{nyud,pascal}.json), the parameter counts, and
bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
max |diff| = 0 for every task's final prediction and the deep supervision of all four scales, both
datasets."""

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
    manifest = load_manifest(f"mtinet_{dataset}")
    state = release_state(manifest)
    conversion = FORMATS["mtinet"](state, dataset, None, None)
    config = conversion.config
    b = config.backbone
    assert (b.name, b.kwargs, b.upsample_mode, b.bn_momentum) == ("hrnet_w18_small_v2", {"feature_location": ""}, "bilinear", 0.01)
    assert list(config.tasks) == TASKS[dataset]
    assert config.decoder == "mtinet" and config.decoder_options == {}
    assert conversion.skipped == {}  # the release uses every parameter
    source = TASKS[dataset][-1]  # depth (NYUD), edge (PASCAL)
    pairs = {"decoder.propagation.2.se.semseg.squeeze.2.weight": "fpm_scale_3.se.semseg.squeeze.2.weight",
             "decoder.propagation.0.reduction.downsample.0.weight": "fpm_scale_1.dimensionality_reduction.downsample.0.weight",
             f"decoder.distillation.0.messages.semseg.{source}.attention.weight":
             f"distillation_scale_0.self_attention.semseg.{source}.attention.0.weight"}
    if dataset == "pascal":
        pairs.update({"decoder.scales.1.predictions.parts.bias": "scale_1.decoders.human_parts.bias",
                      "decoder.heads.saliency.3.weight": "heads.sal.last_layer.3.weight"})
    assert all(conversion.state_dict[mine] is state[release] for mine, release in pairs.items())
    with torch.device("meta"):
        model = build_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    model.load_state_dict(conversion.state_dict, strict=True, assign=True)
    # the release: 8,578,179 (NYUD) / 24,494,171 (PASCAL) parameters
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]


def test_a_random_release_checkpoint_converts_loads_and_runs(tmp_path):
    state = release_state(load_manifest("mtinet_nyud"), device="cpu")
    torch.save(state, tmp_path / "best_model.pth.tar")
    out = convert_checkpoint("mtinet", tmp_path / "best_model.pth.tar", "nyud", tmp_path / "folder")
    model = load_model(out).eval()
    own = model.state_dict()
    assert torch.equal(own["decoder.scales.3.refinement.depth.1.conv2.weight"], state["scale_3.refinement.depth.1.conv2.weight"])
    assert torch.equal(own["decoder.heads.semseg.1.running_var"], state["heads.semseg.last_layer.1.running_var"])
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 64, 64)).predictions
    assert pred["semseg"].shape == (1, 40, 64, 64) and torch.isfinite(pred["depth"]).all()


def test_bad_checkpoints_are_refused_with_the_reason():
    nyud = release_state(load_manifest("mtinet_nyud"))
    with pytest.raises(ConversionError, match="not the pascal release's"):
        FORMATS["mtinet"](nyud, "pascal", None, None)
    with pytest.raises(ConversionError, match="not an MTI-Net checkpoint"):
        FORMATS["mtinet"](release_state(load_manifest("padnet_nyud")), "nyud", None, None)
    odd = dict(nyud)
    odd["backbone.transition1.0.0.weight"] = torch.empty(20, 256, 3, 3, device="meta")
    with pytest.raises(ConversionError, match="fits no timm HRNet"):
        FORMATS["mtinet"](odd, "nyud", None, None)
    aux = dict(nyud)  # mti_net+edges_normals: normals and edges as auxiliary-only tasks
    aux["scale_0.decoders.edge.weight"] = torch.empty(1, 18, 1, 1, device="meta")
    with pytest.raises(ConversionError, match="auxiliary-only tasks"):
        FORMATS["mtinet"](aux, "nyud", None, None)
