"""M3ViT release -> mtvision: the key mapping pinned by the release's manifests (keys and shapes of
the authors' models at their training size and at 128 x 192, tests/convert/manifests/m3vit_*.json),
the parameter counts, and bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
identical top-4 routing for every token and gate, max |diff| / max |output| <= 3.2e-6 for every
task's prediction and TAM prediction, and the same balancing loss, both datasets."""

from __future__ import annotations

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError
from mtvision.models.pretrained import load_model
from mtvision.models.registry import build_model
from tests.convert.release_state import load_manifest, release_state

TASKS = {"nyud": ["semseg", "depth"], "pascal": ["semseg", "parts", "saliency", "normals", "edge"]}






@pytest.mark.parametrize("name", ["m3vit_nyud_full", "m3vit_pascal_full", "m3vit_nyud_small", "m3vit_pascal_small"])
def test_release_maps_exactly_onto_the_model(name):
    manifest = load_manifest(name)
    dataset, size = manifest["dataset"], manifest["input_size"]
    full = name.endswith("full")
    conversion = FORMATS["m3vit"](release_state(manifest), dataset, None if full else tuple(size), None)
    config = conversion.config
    b = config.backbone
    assert (b.name, b.out_indices, b.output_norm) == ("deit_small_patch16_224", [11], "none")  # no final norm
    assert b.kwargs == {"num_heads": 12, "img_size": size, "dynamic_img_size": True}
    assert list(config.tasks) == TASKS[dataset]
    levels = [0, 1, 2] if dataset == "nyud" else [0, 1]  # the PASCAL config turns TAM level 2 off
    assert config.decoder_options == {"num_experts": 16, "top_k": 4, "expert_mlp_ratio": 1.0, "head_channels": 256, "tam_levels": levels}
    assert conversion.skipped == {}  # the TAMs are used in training
    with torch.device("meta"):
        model = build_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    model.load_state_dict(conversion.state_dict, strict=True, assign=True)
    # the release at 480x640 / 512x512: 71,802,148 (NYUD) / 103,983,075 (PASCAL) parameters
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]


@pytest.mark.slow
def test_a_random_release_checkpoint_converts_loads_and_runs(tmp_path):
    manifest = load_manifest("m3vit_nyud_small")
    state = release_state(manifest, device="cpu")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "merged.pth")
    out = convert_checkpoint("m3vit", tmp_path / "merged.pth", "nyud", tmp_path / "folder", input_size=(128, 192))
    model = load_model(out).eval()
    own = model.state_dict()
    pairs = {"decoder.backbone.vit.blocks.5.moe.gate_weight.depth": "backbone.blocks.5.mlp.gate.1.w_gate",
             "decoder.backbone.vit.blocks.11.moe.w2": "backbone.blocks.11.mlp.experts.h4toh.weight",
             "decoder.heads.semseg.norms.3.running_var": "decoders.semseg.syncbn_fc_3.running_var",
             "decoder.tam.2.up.1.0.weight": "tam_model2.decoder1.0.weight",
             "decoder.tam.0.predict.depth.weight": "tam_model0.layers4.depth.0.weight"}
    for mine, release in pairs.items():
        assert torch.equal(own[mine], state[release]), mine
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 128, 192)).predictions
    assert pred["semseg"].shape == (1, 40, 128, 192) and torch.isfinite(pred["depth"]).all()


def test_bad_checkpoints_are_refused_with_the_reason():
    nyud = release_state(load_manifest("m3vit_nyud_full"))
    with pytest.raises(ConversionError, match="not the pascal release's"):
        FORMATS["m3vit"](nyud, "pascal", None, None)
    with pytest.raises(ConversionError, match="not an M3ViT"):
        FORMATS["m3vit"](release_state(load_manifest("padnet_nyud")), "nyud", None, None)
    with pytest.raises(ConversionError, match="1201 tokens, which does not fit 512x512.*--input-size"):
        FORMATS["m3vit"](nyud, "nyud", (512, 512), None)
    rank0 = {k: (torch.empty(8, *v.shape[1:], device="meta") if ".mlp.experts." in k else v) for k, v in nyud.items()}
    with pytest.raises(ConversionError, match="holds 8 of the 16 experts.*merge them first"):
        FORMATS["m3vit"](rank0, "nyud", None, None)
    wide = dict(nyud)
    wide["backbone.cls_token"] = torch.empty(1, 1, 768, device="meta")
    with pytest.raises(ConversionError, match="no known ViT has width 768"):
        FORMATS["m3vit"](wide, "nyud", None, None)
