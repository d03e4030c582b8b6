"""TaskPrompter release -> mtvision: the key mapping pinned by the release's manifests (keys and
shapes of the authors' models, tests/convert/manifests/taskprompter_*.json: ViT-L NYUD and PASCAL,
ViT-B PASCAL at full size, ViT-B builds at 128x192), the full-size parameter counts, the parameters
skipped on purpose, the size-tied tensors, and bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
max |diff| / max |output| <= 8.3e-7 for every task of the NYUD, PASCAL ViT-B and PASCAL ViT-L
configurations."""

from __future__ import annotations

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError
from mtvision.models.pretrained import load_model
from tests.convert.release_state import load_manifest, meta_model, release_state

TASKS = {"nyud": ["semseg", "depth", "normals", "edge"], "pascal": ["semseg", "parts", "saliency", "normals", "edge"]}
# manifest -> (timm backbone, taps, read-out / fused widths, channel windows, cross-task reweighting)
CASES = {
    "taskprompter_nyud_full": ("vit_large_patch16_384", [5, 11, 17, 23], 768, 768, 16, False),
    "taskprompter_pascal_full": ("vit_large_patch16_384", [5, 11, 17, 23], 300, 350, 1, True),
    "taskprompter_pascal_vitb_full": ("vit_base_patch16_384", [2, 5, 8, 11], 780, 1024, 16, True),
    "taskprompter_nyud_small": ("vit_base_patch16_384", [2, 5, 8, 11], 768, 768, 16, False),
    "taskprompter_pascal_small": ("vit_base_patch16_384", [2, 5, 8, 11], 300, 350, 1, True),
}








@pytest.mark.parametrize("name", sorted(CASES))
def test_release_maps_exactly_onto_the_model_and_skips_only_its_unused_parameters(name):
    manifest = load_manifest(name)
    backbone, taps, tar, fin, windows, ctr = CASES[name]
    dataset, size = manifest["dataset"], tuple(manifest["input_size"])
    conversion = FORMATS["taskprompter"](release_state(manifest), dataset, size, None)
    config = conversion.config
    assert (config.backbone.name, config.backbone.out_indices, config.backbone.output_norm) == (backbone, taps, "last")
    assert config.backbone.kwargs["img_size"] == list(size)
    assert list(config.tasks) == TASKS[dataset]
    options = {"prompt_len": 1, "channel_heads": windows, "feature_channels": tar, "embed_channels": fin,
               "cross_task_reweighting": ctr}
    assert config.decoder_options == ({**options, "saliency_channels": 2} if dataset == "pascal" else options)
    # the last block's token_trans1 is built and never used (found by a backward pass on the release)
    assert set(conversion.skipped) == set(manifest["unused"])
    model = meta_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    model.load_state_dict(conversion.state_dict, strict=True, assign=True)
    # timm's ViT has a class token the release has not (never read: the prompts replace it)
    width = conversion.state_dict["decoder.prompter.vit.cls_token"].shape[-1]
    assert torch.equal(conversion.state_dict["decoder.prompter.vit.cls_token"], torch.zeros(1, 1, width))
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"] - manifest["unused_parameter_count"] + width


def test_full_size_parameter_counts():
    counts = {}
    for name in ("taskprompter_nyud_full", "taskprompter_pascal_full", "taskprompter_pascal_vitb_full"):
        manifest = load_manifest(name)
        model = meta_model(FORMATS["taskprompter"](release_state(manifest), manifest["dataset"], None, None).config)
        counts[name] = (manifest["param_count"], sum(p.numel() for p in model.parameters()))
    assert counts == {
        "taskprompter_nyud_full": (513_505_709, 512_473_517),
        "taskprompter_pascal_full": (401_104_864, 400_056_288),
        "taskprompter_pascal_vitb_full": (418_332_214, 417_545_782),
    }


@pytest.mark.slow
def test_small_release_converts_loads_strictly_and_runs(tmp_path):
    manifest = load_manifest("taskprompter_pascal_small")
    state = release_state(manifest, device="cpu")
    path = tmp_path / "release.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "iter_count": 40000}, path)  # the release's layout
    out = convert_checkpoint("taskprompter", path, "pascal", tmp_path / "converted", input_size=(128, 192))
    del state
    model = load_model(out).eval()
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 128, 192)).predictions
    assert {t: tuple(p.shape) for t, p in pred.items()} == {
        "semseg": (1, 21, 128, 192), "parts": (1, 7, 128, 192), "saliency": (1, 2, 128, 192),
        "normals": (1, 3, 128, 192), "edge": (1, 1, 128, 192)}
    assert all(bool(p.isfinite().all()) for p in pred.values())
    release = torch.load(path, weights_only=True)["model"]
    weights = model.state_dict()
    assert torch.equal(weights["decoder.prompter.from_channel.3.weight"], release["module.backbone.blocks.3.attn.token_trans1.weight"])
    assert torch.equal(weights["decoder.prompter.ctr.2.saliency.0.weight"], release["module.backbone.ctr_attn_conv.2.sal.0.weight"])


def test_another_models_or_datasets_checkpoint_is_refused():
    with pytest.raises(ConversionError, match="not a TaskPrompter checkpoint"):
        FORMATS["taskprompter"](release_state(load_manifest("invpt_nyud_full")), "nyud", None, None)
    with pytest.raises(ConversionError, match="another dataset"):
        FORMATS["taskprompter"](release_state(load_manifest("taskprompter_nyud_full")), "pascal", (448, 576), None)


def test_sizes_that_do_not_fit_the_size_tied_tensors_are_refused():
    state = release_state(load_manifest("taskprompter_pascal_full"))
    with pytest.raises(ConversionError, match=r"pos_embed has 1025 rows .* 448x576 needs 1009"):
        FORMATS["taskprompter"](state, "pascal", (448, 576), None)
    # a position embedding that fits is not enough: every block's token transforms must fit too
    state["backbone.pos_embed"] = torch.empty(1, 1009, 1024, device="meta")
    with pytest.raises(ConversionError, match="token transforms are for 1024 patches"):
        FORMATS["taskprompter"](state, "pascal", (448, 576), None)


def test_read_out_widths_of_no_released_config_are_refused():
    manifest = load_manifest("taskprompter_nyud_small")
    state = release_state(manifest)
    for key in [k for k in state if k.startswith("backbone.fea_decode_spa.")]:
        state[key] = torch.empty(512, *state[key].shape[1:], device="meta")
    with pytest.raises(ConversionError, match="read-out widths 512/768 match no released TaskPrompter config"):
        FORMATS["taskprompter"](state, "nyud", (128, 192), None)
