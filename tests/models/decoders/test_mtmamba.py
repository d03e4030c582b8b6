"""The cross-task SSM decoder (MTMamba / MTMamba++): the releases' layers (joint LayerNorm of the
cross-task blocks, heads, saliency's two logits, drop-path schedule), task subsets and order, the
model contract (shared representation, task parameters, optional deep supervision).  SS2D is
tested in tests/models/test_ss2d.py; parity with the releases' outputs in tests/convert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtvision.engine.objective import compute_losses
from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.mtmamba import (
    ConvHead,
    CrossTaskSSMDecoder,
    ExpandHead,
    FeatureCTM,
    SemanticCTM,
    SSMDecoderError,
    joint_layer_norm,
    joint_linear,
)
from mtvision.tasks import resolve_tasks

TASKS3 = ("semseg", "depth", "normals")
TINY = dict(channels=8, d_state=4, head_channels=8, drop_path=0.0)


def _model(tasks=TASKS3, backbone="test_resnet", kwargs=None, **options):
    spec = {t: (10 if t == "semseg" else None) for t in tasks}
    torch.manual_seed(0)
    return create_model(
        backbone={"name": backbone, "kwargs": kwargs or {}},
        decoder="mtmamba",
        tasks=spec,
        decoder_options={**TINY, **options},
    )


# ---------------------------------------------------------------------- decoder
@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_outputs_and_deep_supervision_only_in_training(variant):
    model = _model(variant=variant, deep_supervision=True)
    x = torch.randn(2, 3, 32, 64)
    model.train()
    output = model(x)
    out, deep = output.predictions, output.deep_supervision
    assert list(out) == list(TASKS3)
    assert out["semseg"].shape == (2, 10, 32, 64) and out["normals"].shape == (2, 3, 32, 64)
    assert set(deep) == set(TASKS3)
    assert [tuple(a.shape[:2]) for a in deep["semseg"]] == [(2, 10), (2, 10)]  # stages 1 and 2 of 3
    model.eval()
    with torch.no_grad():
        assert model(x).deep_supervision == {}
    default = _model(variant=variant).train()  # the releases: no deep supervision, no aux heads
    assert default.decoder.aux_heads is None and default(x).deep_supervision == {}


def test_learns_with_aux_losses(synthetic_batch):
    model = _model(channels=8, deep_supervision=True).train()
    tasks = model.tasks
    images = synthetic_batch["image"][:2, :, :32, :64]
    batch = {t: synthetic_batch[t][:2, ..., :32, :64] for t in TASKS3}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = model(images)
        total = sum(compute_losses(out.predictions, batch, tasks, out.deep_supervision).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] * 0.9, losses


@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_task_order_does_not_change_any_output(variant):
    model = _model(variant=variant).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(x, tasks=["semseg", "depth", "normals"]).predictions
        b = model(x, tasks=["normals", "semseg", "depth"]).predictions
    assert list(b) == ["normals", "semseg", "depth"]
    for t in TASKS3:
        assert torch.allclose(a[t], b[t], atol=1e-6), t


@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_one_selected_task_is_the_single_task_path(variant):
    multi = _model(variant=variant).eval()
    single = _model(tasks=("depth",), variant=variant).eval()
    missing, unexpected = single.load_state_dict(multi.state_dict(), strict=False)
    assert not missing and unexpected  # the single-task model has no cross-task block
    assert all(isinstance(c, nn.Identity) for c in single.decoder.cross)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(multi(x, tasks=["depth"]).predictions["depth"], single(x).predictions["depth"], atol=1e-6)
        # with all tasks the cross-task block mixes the others in
        assert not torch.allclose(multi(x).predictions["depth"], single(x).predictions["depth"], atol=1e-4)


def test_subset_runs_only_the_selected_branches_and_mixes_them():
    model = _model(variant="mtmamba").eval()
    calls = {t: 0 for t in TASKS3}
    for t in TASKS3:
        for block in model.decoder.expand[t]:
            block.register_forward_pre_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x, tasks=["semseg", "depth"]).predictions
    assert list(out) == ["semseg", "depth"] and calls["normals"] == 0 and calls["semseg"] == 3
    # the cross-task blocks mix the selected tasks only (documented): without normals, semseg changes
    with torch.no_grad():
        full = model(x).predictions
    assert not torch.allclose(out["semseg"], full["semseg"], atol=1e-5)


@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_every_task_loss_reaches_the_shared_representation(variant, synthetic_batch):
    model = _model(variant=variant).train()
    images = synthetic_batch["image"][:2, :, :32, :64]
    out = model(images)
    reps = out.shared
    feats = model.decoder.backbone(images)
    assert [r.shape for r in reps] == [f.shape for f in feats]  # all four levels are read
    for t in TASKS3:
        loss = compute_losses(
            out.predictions, {t: synthetic_batch[t][:2, ..., :32, :64]}, {t: model.tasks[t]}, out.deep_supervision
        )[t]
        grads = torch.autograd.grad(loss, reps, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), t


@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_task_parameters_affect_only_their_task(variant):
    model = _model(variant=variant, deep_supervision=True).train()
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert shared | set().union(*per_task.values()) == {id(p) for p in model.parameters()}
    assert not shared & set().union(*per_task.values())
    assert not per_task["semseg"] & per_task["depth"]
    head = {id(p) for p in model.decoder.heads["depth"].parameters()}
    assert head < per_task["depth"]  # the head and more (aux heads, last cross-task block's own parts)
    out = model(torch.randn(2, 3, 32, 32))
    (out.predictions["depth"].square().mean() + sum(a.mean() for a in out.deep_supervision["depth"])).backward()
    grads = {id(p): p.grad for p in model.parameters()}
    assert all(grads[i] is None or grads[i].abs().sum() == 0 for i in per_task["semseg"] | per_task["normals"])
    assert all(grads[i] is not None for i in per_task["depth"])


def test_single_task_model_owns_its_whole_decoder_branch():
    model = _model(tasks=("depth",))
    owned = {id(p) for p in model.task_parameters("depth")}
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.decoder.backbone.parameters()}
    assert owned and not owned & {id(p) for p in model.decoder.backbone.parameters()}


def test_sizes_not_divisible_by_the_stride_are_padded_and_cropped():
    model = _model(variant="mtmamba++", deep_supervision=True).eval()
    x = torch.randn(1, 3, 130, 150)
    with torch.no_grad():
        out = model(x).predictions
        padded = model(F.pad(x, (0, 10, 0, 30))).predictions  # 160 x 160: what the decoder runs internally
    assert out["semseg"].shape == (1, 10, 130, 150) and out["depth"].shape == (1, 1, 130, 150)
    assert torch.allclose(out["depth"], padded["depth"][..., :130, :150], atol=1e-5)
    model.train()
    aux = model(torch.randn(2, 3, 33, 47)).deep_supervision["normals"]
    assert all(a.shape == (2, 3, 33, 47) for a in aux)


def test_plain_vit_levels_share_a_stride_and_fewer_stages_stop_coarser():
    vit = _model(backbone="test_vit", kwargs={"img_size": 64, "dynamic_img_size": True}, variant="mtmamba").eval()
    assert vit(torch.randn(1, 3, 64, 64)).predictions["depth"].shape == (1, 1, 64, 64)
    assert [e.scale for e in vit.decoder.expand["depth"]] == [1, 1]
    two = _model(stages=2, channels=[8, 12]).eval()
    assert two.decoder.output_stride == 8 and len(two.decoder.cross) == 2
    assert two.decoder.reduce["depth"][1].out_features == 12
    assert two(torch.randn(1, 3, 32, 32)).predictions["depth"].shape == (1, 1, 32, 32)


class _FakeBackbone(nn.Module):
    def __init__(self, strides, channels=(8, 8)):
        super().__init__()
        self.strides, self.channels = list(strides), list(channels)
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return [F.avg_pool2d(self.conv(x), s) for s in self.strides]


@pytest.mark.parametrize(
    "strides, match", [((4, 12), "power-of-two"), ((8, 4), "power-of-two"), ((4,), "two backbone levels")]
)
def test_unfit_backbone_strides_are_a_clear_error(strides, match):
    tasks = resolve_tasks(["depth", "normals"], {})
    with pytest.raises(SSMDecoderError, match=match) as info:
        CrossTaskSSMDecoder(lambda: _FakeBackbone(strides, [8] * len(strides)), tasks, **TINY)
    assert isinstance(info.value, MTVisionError) and isinstance(info.value, ValueError)
    with pytest.raises(SSMDecoderError, match="variant"):
        CrossTaskSSMDecoder(lambda: _FakeBackbone((4, 8)), tasks, variant="mamba", **TINY)


# ---------------------------------------------------------------------- the releases' layers
def test_joint_layer_norm_and_linear_over_the_concatenated_tasks():
    torch.manual_seed(0)
    norm = nn.LayerNorm(12)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    parts = [torch.randn(2, 5, 4) * (1 + i) + i for i in range(3)]
    x = torch.cat(parts, -1)
    assert torch.allclose(joint_layer_norm(parts, norm, [0, 1, 2], 3), F.layer_norm(x, (12,), norm.weight, norm.bias))
    # a subset: statistics over the selected tasks' 8 channels, their slices of the affine parameters
    sub = torch.cat([parts[0], parts[2]], -1)
    mean, var = sub.mean(-1, keepdim=True), sub.var(-1, unbiased=False, keepdim=True)
    keep = [0, 1, 2, 3, 8, 9, 10, 11]
    expected = (sub - mean) / torch.sqrt(var + 1e-5) * norm.weight[keep] + norm.bias[keep]
    assert torch.allclose(joint_layer_norm([parts[0], parts[2]], norm, [0, 2], 3), expected, atol=1e-5)
    weight, bias = torch.randn(6, 12), torch.randn(6)
    assert torch.allclose(joint_linear(x, weight, bias, [0, 1, 2], 3), x @ weight.T + bias)
    expected = 1.5 * (parts[0] @ weight[:, :4].T + parts[2] @ weight[:, 8:].T) + bias  # scaled by T / selected
    assert torch.allclose(joint_linear(sub, weight, bias, [0, 2], 3), expected, atol=1e-5)


@pytest.mark.parametrize("block_cls", [FeatureCTM, SemanticCTM])
def test_cross_task_blocks_normalise_all_tasks_together(block_cls):
    torch.manual_seed(0)
    block = block_cls(["a", "b"], 8, dict(d_state=4)).eval()
    assert block.shared_norm.normalized_shape == (16,) and block.shared_norm.eps == 1e-5
    a, b = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        out = block({"a": a, "b": b})
        # with per-task norms, rescaling task a would not reach task b; the joint norm carries it over
        rescaled = block({"a": 3 * a, "b": b})
        # one affine change of every task's features leaves the jointly normalised input as it was
        joint, _ = block._joint({"a": a, "b": b})
        joint_affine, _ = block._joint({"a": 3 * a + 1, "b": 3 * b + 1})
    assert not torch.allclose(out["b"], rescaled["b"], atol=1e-4)
    assert torch.allclose(joint, joint_affine, atol=1e-4)


def test_the_releases_layer_layout():
    mtmamba = _model(drop_path=0.2)  # the default variant is MTMamba
    assert mtmamba.decoder.variant == "mtmamba" and mtmamba.decoder.aux_heads is None
    dec = mtmamba.decoder
    for s, cross in enumerate(dec.cross):
        width = dec.reduce["depth"][s].out_features
        assert isinstance(cross, FeatureCTM)
        assert cross.shared.in_proj.weight.shape == (2 * width, 3 * width) and cross.shared.out_proj is None
        assert cross.gate["depth"].bias is None and cross.out_proj["depth"].bias is None
        assert dec.expand["depth"][s].expand.bias is None and dec.reduce["depth"][s].bias is not None
        assert all(b.mlp is None for b in dec.stm["depth"][s])
    assert all(isinstance(h, ExpandHead) for h in dec.heads.values())
    # stochastic depth: linspace(0.2, 0, 9) over (STM, STM, cross-task) of each of the three stages
    rates = []
    for s in range(3):
        rates += [dec.stm["depth"][s][j].drop_path.drop_prob for j in (0, 1)]
        rates.append(getattr(dec.cross[s].drop_path, "drop_prob", 0.0))
    assert rates == pytest.approx(torch.linspace(0.2, 0, 9).tolist())
    assert isinstance(dec.cross[-1].drop_path, nn.Identity)
    plus = _model(variant="mtmamba++").decoder
    for s, cross in enumerate(plus.cross):
        width = plus.reduce["depth"][s].out_features
        assert isinstance(cross, SemanticCTM)
        assert cross.share_proj.weight.shape == (width, 3 * width) and cross.share_proj.bias is not None
        assert cross.share_conv.kernel_size == (3, 3) and cross.share_conv.bias is not None
        assert cross.op["depth"].cross
    assert all(isinstance(h, ConvHead) for h in plus.heads.values())


def test_mtmamba_head_expands_four_times_then_projects():
    torch.manual_seed(0)
    head = ExpandHead(8, 5).eval()
    assert head.expand.expand.weight.shape == (128, 8) and head.expand.expand.bias is None
    assert head.out.kernel_size == (1, 1) and head.out.bias is not None
    x = torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        y = head(x)
        assert y.shape == (1, 5, 12, 16)
        # output pixel (4i + p1, 4j + p2) reads channels [(4 p1 + p2) * 8, +8) of the expansion at (i, j)
        i, j, p1, p2 = 2, 1, 3, 2
        chunk = head.expand.expand(x[0, i, j])[(4 * p1 + p2) * 8 : (4 * p1 + p2 + 1) * 8]
        expected = head.out.weight[:, :, 0, 0] @ head.expand.norm(chunk) + head.out.bias
        assert torch.allclose(y[0, :, 4 * i + p1, 4 * j + p2], expected, atol=1e-5)


def test_mtmamba_plus_head_is_conv_with_bias_norm_relu_and_1x1():
    torch.manual_seed(0)
    head = ConvHead(192, 3, 96)
    conv, norm, relu = head.body
    assert conv.kernel_size == (3, 3) and conv.bias is not None and isinstance(norm, nn.BatchNorm2d)
    assert isinstance(relu, nn.ReLU) and head.out.kernel_size == (1, 1) and head.out.bias is not None
    assert 0.019 < conv.weight.std().item() < 0.021  # trunc_normal_(std=0.02)
    assert head.eval()(torch.randn(1, 4, 6, 192)).shape == (1, 3, 4, 6)  # at the last map's size


@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_saliency_head_has_the_releases_two_logits_and_returns_their_difference(variant):
    model = _model(tasks=("semseg", "saliency"), variant=variant).eval()
    head = model.decoder.heads["saliency"]
    assert head.out.out_channels == 2
    seen = []
    head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        pred = model(x).predictions["saliency"]
    two = F.interpolate(seen[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert pred.shape == (1, 1, 32, 32)
    assert torch.allclose(pred, two[:, 1:2] - two[:, 0:1], atol=1e-6)
    # sigmoid of the difference = the release's softmax foreground probability
    assert torch.allclose(torch.sigmoid(pred), two.softmax(1)[:, 1:2], atol=1e-6)
    single = _model(tasks=("semseg", "saliency"), variant=variant, two_class_saliency=False)
    assert single.decoder.heads["saliency"].out.out_channels == 1
