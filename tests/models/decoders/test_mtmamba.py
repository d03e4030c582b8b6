"""SS2D and the cross-task SSM decoder (MTMamba / MTMamba++): scan geometry, cross-task mixing,
task subsets, the model contract (shared representation, task parameters, deep supervision)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtvision.engine.objective import compute_losses
from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.mtmamba import CrossTaskSSMDecoder, SSMDecoderError
from mtvision.models.ssm.selective_scan import selective_scan_reference
from mtvision.models.ssm.ss2d import SS2D, DirectionalScan, flatten_four_ways, merge_four_ways
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


# ---------------------------------------------------------------------- SS2D
def test_four_way_flatten_orders_and_merge():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    seqs = flatten_four_ways(x)[0, :, 0]
    assert seqs[0].tolist() == [0, 1, 2, 3, 4, 5]  # row-major
    assert seqs[1].tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert seqs[2].tolist() == [5, 4, 3, 2, 1, 0] and seqs[3].tolist() == [5, 2, 4, 1, 3, 0]
    assert torch.equal(merge_four_ways(flatten_four_ways(x), 2, 3), 4 * x.flatten(2))


def test_directional_scan_equals_four_reference_scans():
    torch.manual_seed(0)
    scan = DirectionalScan(d_inner=4, d_state=3, dt_rank=2).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    seqs = flatten_four_ways(x)
    proj = torch.einsum("bkdl,kcd->bkcl", seqs, scan.x_proj_weight)
    ys = []
    for k in range(4):
        dt, B, C = proj[:, k].split([2, 3, 3], dim=1)
        rows = slice(4 * k, 4 * k + 4)
        ys.append(
            selective_scan_reference(
                seqs[:, k], scan.dt_proj_weight[k] @ dt, -torch.exp(scan.A_log[rows]), B, C, scan.D[rows],
                delta_bias=scan.dt_proj_bias[k], delta_softplus=True,
            )
        )  # fmt: skip
    expected = merge_four_ways(torch.stack(ys, 1), 3, 5)
    assert torch.allclose(scan(x), expected, atol=1e-10)


def test_scan_of_transposed_map_with_swapped_directions_is_transposed():
    torch.manual_seed(0)
    scan = DirectionalScan(d_inner=3, d_state=4, dt_rank=1).double()
    swapped = DirectionalScan(d_inner=3, d_state=4, dt_rank=1).double()
    order = [1, 0, 3, 2]  # row-major <-> column-major
    with torch.no_grad():
        for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias"):
            getattr(swapped, name).copy_(getattr(scan, name)[order])
        for name in ("A_log", "D"):
            getattr(swapped, name).copy_(getattr(scan, name).view(4, 3, -1)[order].reshape_as(getattr(scan, name)))
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    y = scan(x).view(1, 3, 4, 6)
    y_t = swapped(x.transpose(2, 3)).view(1, 3, 6, 4)
    assert torch.allclose(y_t, y.transpose(2, 3), atol=1e-10)


def test_ss2d_mamba_initialisation_and_defaults():
    block = SS2D(64)
    assert block.d_inner == 128 and block.dt_rank == 4 and block.scan.d_state == 16
    assert block.conv.kernel_size == (3, 3) and block.conv.groups == 128
    a = torch.exp(block.scan.A_log)
    assert torch.allclose(a, torch.arange(1, 17.0).expand_as(a))
    dt = F.softplus(block.scan.dt_proj_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(block.scan.D, torch.ones(4 * 128))


def test_cross_ss2d_reads_delta_b_c_from_the_source():
    torch.manual_seed(0)
    block = SS2D(8, d_state=4, cross=True).eval()
    x, src = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 6, 8)
    y = block(x, src)
    assert not torch.allclose(y, block(x, src + torch.randn_like(src)))
    # the scanned input u is the task's own feature: its gradient reaches x and the source
    x.requires_grad_(True)
    src.requires_grad_(True)
    gx, gs = torch.autograd.grad(block(x, src).sum(), [x, src])
    assert gx.abs().sum() > 0 and gs.abs().sum() > 0
    with pytest.raises(ValueError, match="source"):
        block(x)


# ---------------------------------------------------------------------- decoder
@pytest.mark.parametrize("variant", ["mtmamba", "mtmamba++"])
def test_outputs_and_deep_supervision_only_in_training(variant):
    model = _model(variant=variant)
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
    assert _model(deep_supervision=False).train()(x).deep_supervision == {}


def test_learns_with_aux_losses(synthetic_batch):
    model = _model(channels=8).train()
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
    model = _model(variant=variant).train()
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
    model = _model(variant="mtmamba++").eval()
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
