"""MTMamba / MTMamba++ releases -> mtvision: the key mapping pinned by the releases' manifests (keys
and shapes of the authors' models, tests/convert/manifests/mtmamba*_{nyud,pascal}_{small,full}.json),
the full-size parameter counts, and bad input refused clearly.

Numerical parity with the authors' code (their fixtures, outside the repo) was checked separately:
max |diff| / max |output| <= 1.5e-6 for every task of the four models."""

from __future__ import annotations

import pytest
import torch

from mtvision.convert import FORMATS, convert_checkpoint
from mtvision.convert.base import ConversionError
from mtvision.convert.mtmamba import _relative_position_index, infer_swin
from mtvision.models.pretrained import load_model
from mtvision.models.registry import build_model
from mtvision.models.swin_mmseg import mmseg_merging_to_timm
from tests.convert.release_state import load_manifest, release_state

CASES = [(f, d) for f in ("mtmamba", "mtmamba_plus") for d in ("nyud", "pascal")]
TASKS = {"nyud": ["semseg", "depth", "normals", "edge"], "pascal": ["semseg", "parts", "saliency", "normals", "edge"]}


SPECIAL = {"relative_position_index": lambda shape: _relative_position_index(round(shape[0] ** 0.5))}  # a Swin's, as built


def _manifest(fmt: str, dataset: str, size: str) -> dict:
    return load_manifest(f"{fmt}_{dataset}_{size}")


@pytest.mark.parametrize("fmt, dataset", CASES)
def test_full_size_release_maps_exactly_onto_the_model(fmt, dataset):
    manifest = _manifest(fmt, dataset, "full")
    conversion = FORMATS[fmt](release_state(manifest, special=SPECIAL), dataset, None, None)
    config = conversion.config
    assert config.backbone.name == "swin_large_patch4_window12_384"
    b = config.backbone
    assert (b.swin_impl, b.output_norm, b.output_norm_eps, b.drop_path_rate) == ("mmseg", "all", 1e-5, 0.1)
    assert list(config.tasks) == TASKS[dataset]  # the release's order, mtvision's names
    assert config.decoder_options == {"variant": {"mtmamba": "mtmamba", "mtmamba_plus": "mtmamba++"}[fmt]}
    assert config.preprocess.input_size == ([448, 576] if dataset == "nyud" else [512, 512])
    assert set(conversion.skipped) == {k for k, _ in manifest["keys"] if k.endswith("relative_position_index")}
    with torch.device("meta"):
        model = build_model(config)
    own = model.state_dict()
    assert own.keys() == conversion.state_dict.keys()
    assert all(own[k].shape == conversion.state_dict[k].shape for k in own)
    # the release's parameter count: 308.0M / 335.9M (MTMamba), 315.0M / 343.2M (MTMamba++)
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]


@pytest.mark.parametrize(
    "fmt, dataset",
    [pytest.param(f, d, marks=[] if (f, d) == ("mtmamba_plus", "pascal") else [pytest.mark.slow]) for f, d in CASES],
)
def test_small_release_converts_loads_strictly_and_runs(tmp_path, fmt, dataset):
    manifest = _manifest(fmt, dataset, "small")
    state = release_state(manifest, device="cpu", special=SPECIAL)
    path = tmp_path / "release.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # the releases' DDP layout
    out = convert_checkpoint(fmt, path, dataset, tmp_path / "converted", input_size=(64, 96))
    model = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    sd = model.state_dict()
    # values are carried over: a PatchMerging reduction (reordered), a decoder tensor (renamed)
    assert torch.equal(sd["decoder.backbone.body.layers_2.downsample.reduction.weight"],
                       mmseg_merging_to_timm(state["backbone.stages.1.downsample.reduction.weight"]))
    assert torch.equal(sd["decoder.backbone.output_norms.3.weight"], state["backbone.norm3.weight"])
    release_task = "human_parts" if dataset == "pascal" else "depth"
    task = "parts" if dataset == "pascal" else "depth"
    assert torch.equal(sd[f"decoder.heads.{task}.out.weight"], state[f"final_project.{release_task}.weight"])
    with torch.no_grad():
        pred = model(torch.randn(1, 3, 64, 96)).predictions
    assert list(pred) == TASKS[dataset]
    assert all(p.shape[-2:] == (64, 96) and torch.isfinite(p).all() for p in pred.values())
    if dataset == "pascal":
        assert pred["saliency"].shape[1] == 1 and pred["parts"].shape[1] == 7


def test_backbone_size_is_read_from_the_shapes():
    small = release_state(_manifest("mtmamba", "nyud", "small"), special=SPECIAL)
    assert infer_swin(small) == ("swin_tiny_patch4_window7_224", 7)
    assert infer_swin(release_state(_manifest("mtmamba_plus", "pascal", "full"), special=SPECIAL)) == ("swin_large_patch4_window12_384", 12)
    odd = dict(small, **{"backbone.patch_embed.projection.weight": torch.empty(80, 3, 4, 4, device="meta")})
    with pytest.raises(ConversionError, match="no known Swin"):
        FORMATS["mtmamba"](odd, "nyud", None, None)


def test_another_models_or_datasets_checkpoint_is_refused():
    mtmamba = release_state(_manifest("mtmamba", "nyud", "small"), special=SPECIAL)
    plus = release_state(_manifest("mtmamba_plus", "pascal", "small"), special=SPECIAL)
    with pytest.raises(ConversionError, match="'mtmamba_plus'"):
        FORMATS["mtmamba"](plus, "pascal", None, None)
    with pytest.raises(ConversionError, match="'mtmamba'"):
        FORMATS["mtmamba_plus"](mtmamba, "nyud", None, None)
    with pytest.raises(ConversionError, match="another dataset"):
        FORMATS["mtmamba"](mtmamba, "pascal", None, None)
    with pytest.raises(ConversionError, match="another dataset"):
        FORMATS["mtmamba_plus"](plus, "nyud", None, None)
    with pytest.raises(ConversionError, match="not an MTMamba release"):
        FORMATS["mtmamba"]({"block_1.x.weight": torch.empty(2, device="meta")}, "nyud", None, None)
    with pytest.raises(ConversionError, match="unknown dataset"):
        FORMATS["mtmamba"](mtmamba, "cityscapes", None, None)


def test_unmapped_keys_and_a_foreign_position_index_are_errors():
    state = release_state(_manifest("mtmamba", "nyud", "small"), special=SPECIAL)
    extra = dict(state, **{"block_3.0.extra.weight": torch.empty(3, device="meta")})
    with pytest.raises(ConversionError, match="block_3.0.extra.weight"):
        FORMATS["mtmamba"](extra, "nyud", None, None)
    key = "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"
    bad = dict(state, **{key: state[key].flip(0)})
    with pytest.raises(ConversionError, match="relative_position_index"):
        FORMATS["mtmamba"](bad, "nyud", None, None)
