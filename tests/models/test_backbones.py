"""The timm backbone adapter: feature maps, staged runs, local weights, options and bad input."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from mtvision.errors import UnknownNameError
from mtvision.models.backbones import BackboneError, create_backbone


def _build(spec: dict, **options):
    return create_backbone(spec["name"], **options, **spec["kwargs"])


def test_features_are_nchw_with_declared_channels_and_strides(tiny_backbone):
    torch.manual_seed(0)
    backbone = _build(tiny_backbone).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
    assert len(feats) == len(backbone.channels) == len(backbone.strides) >= 1
    assert min(backbone.strides) >= 4  # timm's stride-2 stem level is left out by default
    for f, c, s in zip(feats, backbone.channels, backbone.strides):
        assert f.shape[:2] == (2, c)
        assert f.shape[-2:] == (math.ceil(64 / s), math.ceil(96 / s))
        assert torch.isfinite(f).all()
    # features depend on the image, and on each image separately
    with torch.no_grad():
        other = backbone(torch.cat([x[:1], torch.randn(1, 3, 64, 96)]))
    assert torch.allclose(other[-1][0], feats[-1][0], atol=1e-5)
    assert not torch.allclose(other[-1][1], feats[-1][1], atol=1e-3)


def test_staged_forward_matches_forward(tiny_backbone):
    torch.manual_seed(0)
    backbone = _build(tiny_backbone).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        plain, staged = backbone(x), backbone.forward_staged(x)
    assert len(plain) == len(staged) == backbone.num_stages
    for a, b in zip(plain, staged):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)


def test_a_copy_runs_its_own_stages():
    torch.manual_seed(0)
    original = create_backbone("test_convnext").eval()
    x = torch.randn(1, 3, 64, 64)
    original.forward_staged(x)  # build the original's stage plan first
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for p in original.parameters():
            p.zero_()
        assert torch.allclose(twin.forward_staged(x)[-1], twin(x)[-1], atol=1e-5)
        assert not torch.allclose(twin.forward_staged(x)[-1], original.forward_staged(x)[-1])


def test_explicit_out_indices_are_kept_as_given():
    backbone = create_backbone("test_resnet", out_indices=(0, 2))
    assert backbone.strides == [2, 8]
    feats = backbone(torch.randn(1, 3, 32, 48))
    assert [f.shape[-2:] for f in feats] == [(16, 24), (4, 6)]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet", pretrained=False).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)
    loaded = create_backbone("test_resnet", weights=str(path)).eval()
    torch.manual_seed(2)
    fresh = create_backbone("test_resnet").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = reference.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        got, other = loaded(x), fresh(x)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-5)
    assert not torch.allclose(other[-1], got[-1], atol=1e-3)


def test_vit_weights_round_trip(tmp_path):
    kwargs = {"img_size": 64, "dynamic_img_size": True}
    torch.manual_seed(3)
    reference = timm.create_model("test_vit", pretrained=False, **kwargs).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = create_backbone("test_vit", weights=path, **kwargs).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        want = reference.forward_intermediates(x, indices=loaded.body.out_indices, intermediates_only=True)
        got = loaded(x)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-5)


def test_missing_weights_file_names_the_option(tmp_path, monkeypatch):
    from tests.hub_cache import use_cache

    with pytest.raises(BackboneError, match="backbone.weights"):
        create_backbone("test_resnet", weights=tmp_path / "nope.safetensors")
    use_cache(monkeypatch, tmp_path / "empty-cache", offline=True)
    with pytest.raises(BackboneError, match="backbone.weights"):
        create_backbone("test_resnet", pretrained=True)


class _Payload:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_object_posing_as_weights_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    for name, dump in [
        ("evil.pth", lambda p: torch.save({"w": _Payload(str(marker))}, p)),
        ("evil.bin", lambda p: p.write_bytes(pickle.dumps({"w": _Payload(str(marker))}))),
    ]:
        path = tmp_path / name
        dump(path)
        with pytest.raises(BackboneError, match="backbone.weights"):
            create_backbone("test_resnet", weights=path)
        assert not marker.exists()


def test_corrupt_safetensors_weights_fail_cleanly(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(3)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(BackboneError, match="backbone.weights"):
        create_backbone("test_resnet", weights=path)


def test_weights_of_another_architecture_fail_cleanly(tmp_path):
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_convnext").state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="test_resnet"):
        create_backbone("test_resnet", weights=path)


def test_unknown_backbone_suggests_close_name():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18"):
        create_backbone("resnet18x")
    with pytest.raises(BackboneError, match="backbone.weights"):
        create_backbone("hf-hub:timm/resnet18.a1_in1k")


def test_drop_path_rate_makes_training_forward_stochastic():
    torch.manual_seed(0)
    backbone = create_backbone("test_convnext", drop_path_rate=0.5).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = backbone(x)[-1], backbone(x)[-1]
        backbone.eval()
        c, d = backbone(x)[-1], backbone(x)[-1]
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    plain = create_backbone("test_convnext").eval()
    cl = create_backbone("test_convnext", channels_last=True).eval()
    cl.load_state_dict(plain.state_dict())
    assert cl.body.stem_0.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.body.stem_0.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), cl(x)):
            assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("spec", [("test_resnet", {}), ("test_vit", {"img_size": 64})])
def test_gradient_checkpointing_gives_the_same_gradients(spec):
    name, kwargs = spec
    torch.manual_seed(0)
    plain = create_backbone(name, **kwargs)
    ckpt = create_backbone(name, grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        model.train()
        sum(f.square().mean() for f in model(x)).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_output_norm_last_is_the_vits_own_final_norm_from_the_weights_file(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("test_vit", img_size=64, dynamic_img_size=True).eval()
    with torch.no_grad():
        full.norm.weight.normal_()
        full.norm.bias.normal_()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    backbone = create_backbone("test_vit", weights=path, img_size=64, dynamic_img_size=True, output_norm="last").eval()
    assert list(backbone.output_norms) == [str(len(backbone.levels) - 1)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = backbone(x)
        last = full.forward_intermediates(x, indices=[int(backbone.body.out_indices[-1])], norm=True, intermediates_only=True)[-1]
        plain = create_backbone("test_vit", weights=path, img_size=64, dynamic_img_size=True).eval()(x)
    torch.testing.assert_close(got[-1], last, atol=1e-5, rtol=1e-5)  # timm's own normed last level
    assert not torch.allclose(plain[-1], last, atol=1e-3)  # without the option it is missing
    for a, b in zip(got[:-1], plain[:-1]):  # the other levels are untouched
        torch.testing.assert_close(a, b)


def test_output_norm_all_is_a_channel_layer_norm_on_every_level():
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", output_norm="all", output_norm_eps=1e-5).eval()
    plain = create_backbone("test_resnet").eval()
    plain.load_state_dict({k: v for k, v in backbone.state_dict().items() if not k.startswith("output_norms.")})
    with torch.no_grad():
        for n in backbone.output_norms.values():
            n.weight.normal_()
            n.bias.normal_()
        x = torch.randn(1, 3, 64, 64)
        got, raw = backbone(x), plain(x)
    assert len(backbone.output_norms) == len(raw)
    for i, (g, r) in enumerate(zip(got, raw)):
        n = backbone.output_norms[str(i)]
        mean, var = r.mean(1, keepdim=True), r.var(1, unbiased=False, keepdim=True)
        want = (r - mean) / torch.sqrt(var + 1e-5) * n.weight.view(1, -1, 1, 1) + n.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(BackboneError, match="stage by stage"):
        backbone.forward_staged(x)
    with pytest.raises(BackboneError, match="output_norm"):
        create_backbone("test_resnet", output_norm="every")


# ---------------------------------------------------------------- timm's pretrained tags through the hub cache
def _hub_weights(cache, name: str, seed: int, **kwargs) -> torch.nn.Module:
    """A timm model with seeded random weights, written into `cache` where timm looks for `name`'s tag."""
    from tests.hub_cache import populate

    torch.manual_seed(seed)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    blob = cache.parent / f"{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(blob))
    populate(cache, repo, {"model.safetensors": blob})
    return reference


@pytest.mark.parametrize("name", ["test_resnet", "test_resnet.r160_in1k"])
def test_pretrained_loads_timms_tag_from_the_hub_cache(tmp_path, monkeypatch, name):
    from tests.hub_cache import use_cache

    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache, offline=True)
    reference = _hub_weights(cache, "test_resnet.r160_in1k", seed=5)  # the default tag of test_resnet
    torch.manual_seed(6)
    loaded = create_backbone(name, pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = reference.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        got = loaded(x)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    # exactly what timm itself loads
    direct = timm.create_model(name, pretrained=True, features_only=True)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), loaded.body.state_dict().values()))


def test_pretrained_vit_copies_the_final_norm_from_the_hub_weights(tmp_path, monkeypatch):
    from tests.hub_cache import use_cache

    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache, offline=True)
    kwargs = {"img_size": 64, "dynamic_img_size": True}
    reference = _hub_weights(cache, "test_vit", seed=7, **kwargs)
    with torch.no_grad():
        reference.norm.weight.mul_(3.0)  # not the default ones, so a copy is visible
    repo = timm.models.get_pretrained_cfg("test_vit").hf_hub_id
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "n.safetensors"))
    from tests.hub_cache import populate

    populate(cache, repo, {"model.safetensors": tmp_path / "n.safetensors"}, commit="f" * 40)
    backbone = create_backbone("test_vit", pretrained=True, output_norm="last", **kwargs)
    norm = backbone.output_norms[str(len(backbone.levels) - 1)]
    assert torch.equal(norm.weight, reference.norm.weight) and torch.equal(norm.bias, reference.norm.bias)


def test_offline_and_not_cached_names_both_ways_out(tmp_path, monkeypatch):
    from tests.hub_cache import use_cache

    use_cache(monkeypatch, tmp_path / "empty", offline=True)
    with pytest.raises(BackboneError) as info:
        create_backbone("test_resnet", pretrained=True)
    message = str(info.value)
    assert "timm/test_resnet.r160_in1k" in message
    assert "model.backbone.weights" in message and "HF_HUB_OFFLINE" in message and "hub cache" in message
    assert str(tmp_path / "empty") in message


def test_hub_offline_is_read_not_set(tmp_path, monkeypatch):
    from mtvision.models.backbones import hub_offline
    from tests.hub_cache import use_cache

    use_cache(monkeypatch, tmp_path, offline=False)
    create_backbone("test_resnet")
    assert hub_offline() is False
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_pretrained_false_trains_from_scratch_even_with_a_weights_file(tmp_path, caplog):
    path = tmp_path / "w.safetensors"
    torch.manual_seed(8)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    torch.manual_seed(9)
    with caplog.at_level("WARNING"):
        scratch = create_backbone("test_resnet", weights=path, pretrained=False)
    torch.manual_seed(9)
    fresh = create_backbone("test_resnet")
    assert all(torch.equal(a, b) for a, b in zip(scratch.state_dict().values(), fresh.state_dict().values()))
    assert "not loaded" in caplog.text
    # and a missing file does not matter then
    create_backbone("test_resnet", weights=tmp_path / "absent.safetensors", pretrained=False)


def test_missing_weights_file_says_how_to_go_without_it(tmp_path):
    with pytest.raises(BackboneError, match="backbone.weights=null") as info:
        create_backbone("test_resnet", weights=tmp_path / "nope.safetensors", pretrained=True)
    assert "backbone.pretrained=false" in str(info.value)


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(UnknownNameError, match="resnet18.tv_in1k"):
        create_backbone("resnet18.tv_in1kk")
