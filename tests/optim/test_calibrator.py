"""GradientCalibrator against hand-assembled per-task gradients on a tiny HPS model."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.errors import UnknownNameError
from mtvision.models.registry import create_model
from mtvision.optim.aggregators import make_aggregator, min_norm_weights
from mtvision.optim.calibrator import CalibrationError, CalibrationStats, GradientCalibrator
from mtvision.optim.factory import make_calibrator

TASKS = {"semseg": 3, "depth": None, "normals": None}


def tiny(decoder: str = "hps"):
    torch.manual_seed(0)
    model = create_model(
        backbone="test_resnet", decoder=decoder, tasks=TASKS, decoder_options={"neck_channels": 16, "head_channels": 8}
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = {
        "semseg": torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2)),
        "depth": torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) + 1,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), dim=1),
    }
    return model, images, targets


def forward(model, images, targets):
    """(per-task losses, the model output they came from)."""
    out = model(images)
    return {t: model.tasks[t].loss(out.predictions[t], targets[t]) for t in TASKS}, out


def losses_of(model, images, targets):
    return forward(model, images, targets)[0]


def calibrate(calibrator, model, images, targets, **kwargs):
    """`calibrator.backward` on a fresh forward, with that forward's shared representation and branches."""
    losses, out = forward(model, images, targets)
    return calibrator.backward(losses, out.shared, out.branches, **kwargs)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def summed_loss_grads(model, images, targets):
    model.zero_grad(set_to_none=True)
    sum(losses_of(model, images, targets).values()).backward()
    return grads(model)


@pytest.mark.parametrize("level", ["features", "params"])
@pytest.mark.parametrize("decoder", ["hps", "padnet"])  # padnet: shared distillation weights after the representation
def test_equal_weights_reproduce_the_summed_loss_gradient(level, decoder):
    model, images, targets = tiny(decoder)
    want = summed_loss_grads(model, images, targets)
    model.zero_grad(set_to_none=True)
    stats = calibrate(GradientCalibrator(model, make_aggregator("ew"), level), model, images, targets)
    got = grads(model)
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())  # float32 re-association of the task sum
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * scale)
    assert stats.weights == {"semseg": 1.0, "depth": 1.0, "normals": 1.0}


MULTI_LEVEL = {  # decoders whose shared representation is several backbone levels
    "invpt": {"task_channels": 16, "prediction_channels": 8},
    "taskexpert": {"num_experts": 2, "channels": 8, "head_channels": 8},
    "mtmamba": {"channels": 8, "head_channels": 8},
    "branched": {"spec": {"tasks": list(TASKS), "stages": [[list(TASKS)]] * 2 + [[["semseg"], ["depth", "normals"]]] * 2},
                 "neck_channels": 8, "head_channels": 8},
}


@pytest.mark.parametrize("decoder", sorted(MULTI_LEVEL))
def test_equal_weights_at_several_representation_tensors_are_the_summed_gradient(decoder):
    """The representation is a cut: a backbone level's gradient excludes the paths through later
    levels computed from it, so backpropagating from every level counts each path once."""
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder=decoder, tasks=TASKS, decoder_options=MULTI_LEVEL[decoder])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = {"semseg": torch.randint(0, 3, (2, 64, 64), generator=g), "depth": torch.rand(2, 1, 64, 64, generator=g) + 1,
               "normals": torch.nn.functional.normalize(torch.randn(2, 3, 64, 64, generator=g), dim=1)}
    torch.manual_seed(2)  # the same drop-path draws in both forwards
    want = summed_loss_grads(model, images, targets)
    torch.manual_seed(2)
    losses, out = forward(model, images, targets)
    assert len(out.shared) >= 2
    model.zero_grad(set_to_none=True)
    GradientCalibrator(model, make_aggregator("ew"), "features").backward(losses, out.shared)
    got = grads(model)
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}")


def test_fuller_with_equal_branch_norms_is_the_summed_gradient():
    """With the branch gradients rescaled by 1 (a single branch), FULLER is plain backpropagation."""
    torch.manual_seed(0)
    model = create_model(backbone={"name": "test_resnet", "out_indices": [3]}, decoder="hps", tasks=TASKS,
                         decoder_options={"neck_channels": 16, "head_channels": 8})
    _, images, targets = tiny()
    want = summed_loss_grads(model, images, targets)
    model.zero_grad(set_to_none=True)
    calibrate(GradientCalibrator(model, make_aggregator("ew"), "fuller"), model, images, targets)
    scale = max(float(g.abs().max()) for g in want.values())
    got = grads(model)
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6 * scale)


def test_features_level_mgda_matches_a_hand_assembled_update():
    model, images, targets = tiny()
    losses, out = forward(model, images, targets)
    reps = out.shared
    g = [torch.autograd.grad(losses[t], reps, retain_graph=True)[0] for t in TASKS]
    flat = torch.stack([x.reshape(-1).double() for x in g])
    k = flat @ flat.T
    w = torch.as_tensor(min_norm_weights(k.numpy()))
    shared = list(model.shared_parameters())
    want_shared = torch.autograd.grad(reps, shared, grad_outputs=[sum(float(wi) * gi for wi, gi in zip(w, g))], retain_graph=True)
    want_heads = {t: torch.autograd.grad(losses[t], list(model.task_parameters(t)), retain_graph=True) for t in TASKS}

    model.zero_grad(set_to_none=True)
    stats = GradientCalibrator(model, make_aggregator("mgda"), "features").backward(losses, reps)
    torch.testing.assert_close(stats.gramian, k, rtol=1e-10, atol=0)
    assert [stats.weights[t] for t in TASKS] == pytest.approx(w.tolist(), rel=1e-9)
    assert abs(sum(stats.weights.values()) - 1) < 1e-9 and min(stats.weights.values()) < 0.99  # really reweighted
    for p, want in zip(shared, want_shared):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)
    for t in TASKS:  # heads keep their own task's plain gradient, whatever the weights
        for p, want in zip(model.task_parameters(t), want_heads[t]):
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-9)
    norms = stats.gramian.diagonal().sqrt()
    torch.testing.assert_close(stats.cosines, stats.gramian / torch.outer(norms, norms))


def test_params_level_pcgrad_gramian_is_over_the_shared_parameters():
    model, images, targets = tiny()
    losses = losses_of(model, images, targets)
    shared = list(model.shared_parameters())
    flat = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)]).double() for t in TASKS]
    )
    model.zero_grad(set_to_none=True)
    stats = GradientCalibrator(model, make_aggregator("pcgrad"), "params").backward(losses)
    torch.testing.assert_close(stats.gramian, flat @ flat.T, rtol=1e-10, atol=0)
    w = torch.tensor([stats.weights[t] for t in TASKS], dtype=torch.float64)
    combined = (w[:, None] * flat).sum(0)
    got = torch.cat([p.grad.reshape(-1) for p in shared]).double()
    torch.testing.assert_close(got, combined, rtol=1e-5, atol=1e-8)


def test_bad_input_is_a_clear_error():
    model, images, targets = tiny()
    with pytest.raises(CalibrationError, match="unknown calibration level"):
        GradientCalibrator(model, make_aggregator("ew"), "layers")
    with pytest.raises(CalibrationError, match="at least one task"):
        GradientCalibrator(model, make_aggregator("ew")).backward({})
    with pytest.raises(UnknownNameError, match="did you mean 'pcgrad'"):
        make_calibrator(model, "pcgard")
    with pytest.raises(UnknownNameError, match="did you mean 'c'"):
        make_calibrator(model, "cagrad", cc=0.5)
    losses, out = forward(model, images, targets)
    losses["depth"] = sum(p.sum() for p in model.task_parameters("depth"))  # reaches its head only
    with pytest.raises(CalibrationError, match="task 'depth' has no gradient path to the shared representation"):
        GradientCalibrator(model, make_aggregator("ew")).backward(losses, out.shared)
    losses = losses_of(model, images, targets)
    losses["depth"] = sum(p.sum() for p in model.task_parameters("depth"))
    with pytest.raises(CalibrationError, match="task 'depth' has no gradient path to the shared parameters"):
        GradientCalibrator(model, make_aggregator("ew"), "params").backward(losses)
    stitched, images, targets = tiny("cross_stitch")
    with pytest.raises(CalibrationError, match="level='params'"):
        calibrate(GradientCalibrator(stitched, make_aggregator("ew")), stitched, images, targets)
    with pytest.raises(CalibrationError, match="level='params'"):  # features must be given explicitly
        GradientCalibrator(model, make_aggregator("ew")).backward(losses_of(model, images, targets))
    losses, out = forward(model, images, targets)
    with pytest.raises(CalibrationError, match="branch points"):
        GradientCalibrator(model, make_aggregator("ew"), "fuller").backward(losses, out.shared)


@pytest.mark.parametrize("level", ["features", "params"])
def test_a_nan_loss_gives_a_non_finite_step_and_leaves_the_aggregator_state_alone(level):
    model, images, targets = tiny()
    aggregator = make_aggregator("gradvac")
    before = aggregator.state_dict()
    losses, out = forward(model, images, targets)
    losses["depth"] = losses["depth"] * float("nan")
    stats = GradientCalibrator(model, aggregator, level).backward(losses, out.shared)
    assert not stats.finite and stats.weights == {t: 1.0 for t in TASKS}
    assert str(aggregator.state_dict()) == str(before)
    assert not all(torch.isfinite(p.grad).all() for p in model.shared_parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "gradvac"])
def test_a_task_with_zero_gradient_gives_finite_weights_and_gradients(method):
    model, images, targets = tiny()
    losses, out = forward(model, images, targets)
    losses["depth"] = losses["depth"] * 0.0
    stats = GradientCalibrator(model, make_aggregator(method)).backward(losses, out.shared)
    assert stats.finite and all(math.isfinite(w) for w in stats.weights.values())
    assert float(stats.gramian[1, 1]) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("level", ["features", "params", "fuller"])
def test_a_single_task_is_its_plain_gradient(level):
    model, images, targets = tiny()
    out = model(images)
    model.tasks["depth"].loss(out.predictions["depth"], targets["depth"]).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    out = model(images)
    loss = model.tasks["depth"].loss(out.predictions["depth"], targets["depth"])
    stats = GradientCalibrator(model, make_aggregator("mgda"), level).backward({"depth": loss}, out.shared, out.branches)
    assert stats.weights == {"depth": 1.0}
    got = grads(model)
    if level == "fuller":  # one active branch per scale; each rescaled to the mean norm: check the heads only
        want = {k: v for k, v in want.items() if k.startswith("decoder.heads")}
        got = {k: v for k, v in got.items() if k.startswith("decoder.heads")}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_loss_scale_scales_the_gradients_but_not_the_weights_or_the_gramian():
    model, images, targets = tiny()
    plain = calibrate(GradientCalibrator(model, make_aggregator("mgda")), model, images, targets)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    scaled = calibrate(GradientCalibrator(model, make_aggregator("mgda")), model, images, targets, loss_scale=1024.0)
    assert scaled.weights == pytest.approx(plain.weights, rel=1e-9)
    torch.testing.assert_close(scaled.gramian, plain.gramian, rtol=1e-9, atol=0)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, 1024.0 * want[name], rtol=1e-5, atol=1e-6)


def test_fuller_equalises_the_gradient_norms_entering_each_backbone_scale():
    model, images, targets = tiny()
    losses, out = forward(model, images, targets)
    reps, branches = out.shared, out.branches
    d = sum(torch.autograd.grad(losses[t], reps, retain_graph=True)[0] for t in TASKS)  # EW
    raw = torch.autograd.grad(reps, branches, grad_outputs=[d], retain_graph=True, allow_unused=True)
    raw = [torch.zeros_like(b) if g is None else g for b, g in zip(branches, raw)]
    norms = torch.stack([g.double().norm() for g in raw])
    target = norms[norms > 0].mean()
    equalised = [g * float(target / n) if n > 0 else g for g, n in zip(raw, norms)]
    backbone = list(model.decoder.backbone.parameters())
    want_backbone = torch.autograd.grad(branches, backbone, grad_outputs=equalised, retain_graph=True)
    neck = list(model.decoder.neck.parameters())
    want_neck = torch.autograd.grad(reps, neck, grad_outputs=[d], retain_graph=True)
    assert (norms > 0).sum() >= 2 and float(norms.max() / norms[norms > 0].min()) > 1.5  # the test has teeth

    model.zero_grad(set_to_none=True)
    GradientCalibrator(model, make_aggregator("ew"), "fuller").backward(losses, reps, branches)
    for p, want in zip(backbone, want_backbone):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)
    for p, want in zip(neck, want_neck):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("level", ["features", "params"])
def test_graddrop_with_full_leak_is_the_summed_gradient_and_without_leak_differs(level):
    model, images, targets = tiny()
    want = summed_loss_grads(model, images, targets)
    model.zero_grad(set_to_none=True)
    calibrate(make_calibrator(model, "graddrop", level, leak=1.0), model, images, targets)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)
    calibrate(make_calibrator(model, "graddrop", level), model, images, targets)
    shared_names = [n for n, _ in model.named_parameters() if n.startswith("decoder.backbone")]
    assert any(not torch.allclose(grads(model)[n], want[n]) for n in shared_names)


def test_stats_report_weights_cosines_and_condition_number():
    stats = CalibrationStats({"a": 0.5, "b": 1.5}, torch.tensor([[4.0, -2.0], [-2.0, 4.0]], dtype=torch.float64),
                             torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64))
    assert stats.condition_number == pytest.approx(6.0 / 2.0)  # eigenvalues 6 and 2
    assert stats.scalars() == {"weight/a": 0.5, "weight/b": 1.5, "cos/a~b": -0.5, "gramian_cond": pytest.approx(3.0)}
    singular = CalibrationStats({"a": 1, "b": 1}, torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    assert singular.condition_number == float("inf")


# ---------------------------------------------------------------- reused weights (Nash-MTL every N steps)


def close_to(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every gradient equal up to float32 rounding of the largest gradient entry."""
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("level", ["features", "params"])
@pytest.mark.parametrize("decoder", ["hps", "padnet"])
def test_reused_weights_take_one_backward_pass_with_the_same_gradients(level, decoder, monkeypatch):
    model, images, targets = tiny(decoder)
    fast = GradientCalibrator(model, make_aggregator("nash_mtl", update_weights_every=3), level)
    slow = GradientCalibrator(model, make_aggregator("nash_mtl", update_weights_every=3), level)
    monkeypatch.setattr(slow.aggregator, "reuse", lambda n: None)  # the per-task path, reusing α inside weights()
    calls = []
    real = torch.autograd.grad

    def counting(outputs, inputs, *args, **kwargs):
        calls.append(1)
        return real(outputs, inputs, *args, **kwargs)

    for step in range(4):
        images = images + 0.1 * step  # a new batch each step
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(torch.autograd, "grad", counting)
        calls.clear()
        got_stats = calibrate(fast, model, images, targets)
        monkeypatch.setattr(torch.autograd, "grad", real)
        got = grads(model)
        model.zero_grad(set_to_none=True)
        want_stats = calibrate(slow, model, images, targets)
        want = grads(model)
        close_to(got, want)
        reused = step % 3 != 0
        assert len(calls) == (1 if reused else len(TASKS))  # one pass of Σ α L instead of T per-task passes
        assert got_stats.finite and math.isnan(float(got_stats.gramian[0, 0])) == reused
        for t in TASKS:
            assert got_stats.weights[t] == pytest.approx(want_stats.weights[t], rel=1e-5)
    assert fast.aggregator.state_dict()["step"] == slow.aggregator.state_dict()["step"] == 4


def test_reused_weights_keep_each_head_its_own_gradient_even_at_weight_zero():
    model, images, targets = tiny()
    aggregator = make_aggregator("nash_mtl", update_weights_every=2, max_norm=0)
    calibrator = GradientCalibrator(model, aggregator, "params")
    calibrate(calibrator, model, images, targets)
    aggregator._alpha[1] = 0.0  # depth weighted 0 on the reused step
    model.zero_grad(set_to_none=True)
    calibrate(calibrator, model, images, targets)
    got = grads(model)
    model.zero_grad(set_to_none=True)
    losses_of(model, images, targets)["depth"].backward()
    want = grads(model)
    for name in want:
        if name.startswith("decoder.heads.depth"):
            torch.testing.assert_close(got[name], want[name])


# ---------------------------------------------------------------- gradient trackers


@pytest.mark.parametrize("method", ["db_mtl", "moco", "excess_mtl"])
def test_trackers_get_the_averaged_shared_gradients_and_their_losses(method, monkeypatch):
    model, images, targets = tiny()
    calibrator = make_calibrator(model, method, "params")
    seen = {}
    real = type(calibrator.aggregator).combine

    def spy(self, g, values):
        seen["grads"], seen["losses"] = g.clone(), values.clone()
        out = real(self, g, values)
        seen["direction"] = out[0].clone()
        return out

    monkeypatch.setattr(type(calibrator.aggregator), "combine", spy)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses, out = forward(model, images, targets)
        stats = calibrator.backward(losses, out.shared)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    flat = []
    for t in TASKS:
        flat.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses_of(model, images, targets)[t], shared)]))
    torch.testing.assert_close(seen["grads"], torch.stack(flat))
    torch.testing.assert_close(seen["losses"], torch.stack([losses_of(model, images, targets)[t].double() for t in TASKS]))
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, seen["direction"])
    assert calibrator.synced_parameters == shared and stats.finite
    for t in TASKS:  # heads keep their own plain gradient
        head = list(model.task_parameters(t))
        want = torch.autograd.grad(losses_of(model, images, targets)[t], head)
        for p, g in zip(head, want):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("method", ["db_mtl", "moco", "excess_mtl"])
def test_trackers_need_the_params_level_and_a_gramian_free_sam(method):
    model, _, _ = tiny()
    for level in ("features", "fuller"):
        with pytest.raises(CalibrationError, match="Use level 'params'"):
            make_calibrator(model, method, level)
    with pytest.raises(CalibrationError, match="sharpness-aware step needs a Gramian aggregator"):
        make_calibrator(model, method, "params", sam_rho=0.05)
    with pytest.raises(UnknownNameError, match="did you mean 'beta'"):
        make_calibrator(model, "db_mtl", "params", betta=0.5)


@pytest.mark.parametrize("method", ["db_mtl", "moco", "excess_mtl"])
def test_trackers_skip_non_finite_steps_without_moving_state(method):
    model, images, targets = tiny()
    calibrator = make_calibrator(model, method, "params")
    calibrate(calibrator, model, images, targets)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in calibrator.state_dict().items()}
    losses, out = forward(model, images, targets)
    losses["depth"] = losses["depth"] * float("nan")
    stats = calibrator.backward(losses, out.shared)
    assert not stats.finite
    after = calibrator.state_dict()
    for k, v in before.items():
        assert (torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]), k


@pytest.mark.parametrize("method", ["db_mtl", "moco", "excess_mtl", "nash_mtl"])
def test_loss_scale_leaves_tracker_state_and_reuse_unchanged(method):
    model, images, targets = tiny()
    options = {"update_weights_every": 2} if method == "nash_mtl" else {}
    runs = []
    for scale in (1.0, 1024.0):
        calibrator = make_calibrator(model, method, "params", **options)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            stats = calibrate(calibrator, model, images, targets, loss_scale=scale)
        runs.append(({n: g / scale for n, g in grads(model).items()}, stats.weights))
    close_to(runs[1][0], runs[0][0])
    for t in TASKS:
        assert runs[1][1][t] == pytest.approx(runs[0][1][t], rel=1e-5)
