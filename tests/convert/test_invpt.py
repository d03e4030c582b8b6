"""InvPT release -> mtvision: the key mapping pinned by the release's manifests (keys and shapes of
the authors' models, tests/convert/manifests/invpt_{nyud,pascal}_{full,small}.json), the full-size
parameter counts, the parameters skipped on purpose, and bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
max |diff| / max |output| <= 2.4e-6 for every task's final and preliminary outputs, both datasets."""

from __future__ import annotations

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError
from mtvision.models.pretrained import load_model
from tests.convert.release_state import load_manifest, meta_model, release_state

TASKS = {"nyud": ["semseg", "depth", "normals", "edge"], "pascal": ["semseg", "parts", "saliency", "normals", "edge"]}








@pytest.mark.parametrize("name", ["invpt_nyud_full", "invpt_pascal_full", "invpt_nyud_small", "invpt_pascal_small"])
def test_release_maps_exactly_onto_the_model_and_skips_only_its_unused_parameters(name):
    manifest = load_manifest(name)
    dataset, size = manifest["dataset"], tuple(manifest["input_size"])
    conversion = FORMATS["invpt"](release_state(manifest), dataset, size, None)
    config = conversion.config
    vit_l = name.endswith("full")
    assert config.backbone.name == ("vit_large_patch16_384" if vit_l else "vit_base_patch16_384")
    assert config.backbone.out_indices == ([5, 11, 17, 23] if vit_l else [2, 5, 8, 11])
    assert (config.backbone.output_norm, config.backbone.output_norm_eps) == ("last", 1e-6)
    assert config.backbone.kwargs["img_size"] == list(size)
    assert list(config.tasks) == TASKS[dataset]  # the release's order, mtvision's names
    expected = {"task_channels": 512, "prediction_channels": 64, "num_stages": 3, "num_heads": 2, "kv_strides": [2, 4, 8]}
    assert config.decoder_options == ({**expected, "saliency_channels": 2} if dataset == "pascal" else expected)
    # exactly the parameters the release builds and never uses (found by a backward pass on its code)
    assert set(conversion.skipped) == set(manifest["unused"])
    model = meta_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    model.load_state_dict(conversion.state_dict, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"] - manifest["unused_parameter_count"]


def test_full_size_parameter_counts():
    # the release: 402,092,888 (NYUD) / 422,929,810 (PASCAL), of which 6,639,562 / 6,972,202 are never used
    counts = {}
    for dataset in ("nyud", "pascal"):
        manifest = load_manifest(f"invpt_{dataset}_full")
        model = meta_model(FORMATS["invpt"](release_state(manifest), dataset, None, None).config)
        counts[dataset] = (manifest["param_count"], sum(p.numel() for p in model.parameters()))
    assert counts == {"nyud": (402_092_888, 395_453_326), "pascal": (422_929_810, 415_957_608)}


@pytest.mark.slow
def test_small_release_converts_loads_strictly_and_runs(tmp_path):
    manifest = load_manifest("invpt_nyud_small")
    state = release_state(manifest, device="cpu")
    path = tmp_path / "release.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "iter_count": 40000}, path)  # the release's layout
    out = convert_checkpoint("invpt", path, "nyud", tmp_path / "converted", input_size=(128, 192))
    del state
    model = load_model(out).eval()
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 128, 192)).predictions
    assert {t: tuple(p.shape) for t, p in pred.items()} == {
        "semseg": (1, 40, 128, 192), "depth": (1, 1, 128, 192), "normals": (1, 3, 128, 192), "edge": (1, 1, 128, 192)}
    assert all(bool(p.isfinite().all()) for p in pred.values())
    weights = dict(model.state_dict())
    assert torch.equal(weights["decoder.skip_proj.2.weight"], torch.load(path, weights_only=True)["model"]["module.multi_task_decoder.scale_embed.0.weight"])


def test_another_models_or_datasets_checkpoint_is_refused():
    taskprompter = release_state(load_manifest("taskprompter_nyud_full"))
    with pytest.raises(ConversionError, match="not an InvPT checkpoint"):
        FORMATS["invpt"](taskprompter, "nyud", None, None)
    pascal = release_state(load_manifest("invpt_pascal_full"))
    with pytest.raises(ConversionError, match="another dataset"):
        FORMATS["invpt"](pascal, "nyud", (512, 512), None)
    nyud = release_state(load_manifest("invpt_nyud_full"))
    nyud["heads.semseg.linear_pred.weight"] = torch.empty(21, 576, 1, 1, device="meta")
    with pytest.raises(ConversionError, match="40 classes|21 classes"):
        FORMATS["invpt"](nyud, "nyud", None, None)


def test_an_input_size_that_does_not_fit_the_position_embedding_is_refused():
    state = release_state(load_manifest("invpt_nyud_full"))
    with pytest.raises(ConversionError, match=r"pos_embed has 1009 rows .* 512x512 needs 1025: .* sizes that fit: 448x576"):
        FORMATS["invpt"](state, "nyud", (512, 512), None)
    small = release_state(load_manifest("invpt_nyud_small"))
    with pytest.raises(ConversionError, match="pos_embed has 97 rows"):
        FORMATS["invpt"](small, "nyud", None, None)  # the release size 448x576 does not fit a 128x192 model
    with pytest.raises(ConversionError, match="multiples of 16"):
        FORMATS["invpt"](small, "nyud", (130, 192), None)


def test_a_backbone_of_no_known_size_and_leftover_keys_are_refused():
    state = release_state(load_manifest("invpt_nyud_small"))
    cut = {k: v for k, v in state.items() if not k.startswith("backbone.blocks.11.")}
    with pytest.raises(ConversionError, match="width 768 and depth 11 fits no known backbone"):
        FORMATS["invpt"](cut, "nyud", (128, 192), None)
    wide = dict(state, **{"backbone.patch_embed.proj.weight": torch.empty(640, 3, 16, 16, device="meta")})
    with pytest.raises(ConversionError, match="width 640"):
        FORMATS["invpt"](wide, "nyud", (128, 192), None)
    extra = dict(state, **{"multi_task_decoder.invpt.extra.weight": torch.empty(3, device="meta")})
    with pytest.raises(ConversionError, match=r"1 checkpoint keys were not mapped, e.g. \['multi_task_decoder.invpt.extra.weight'\]"):
        FORMATS["invpt"](extra, "nyud", (128, 192), None)
