"""The 3D-aware regulariser: rays, tri-plane sampling and volume rendering against hand-computed
values, and the wrapper's contract (training-only, no inference cost, clear errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtvision.config_io import ConfigError
from mtvision.engine.objective import build_objective
from mtvision.models import create_model
from mtvision.models.multitask import MultiTaskModel
from mtvision.models.regularizer3d import rendering as R
from mtvision.models.regularizer3d.model import IntrinsicsError, ThreeDAwareModel, render_grid

TASKS = {"semseg": 5, "depth": None, "normals": None, "edge": None}
K1 = torch.tensor([[30.0, 0.0, 19.5], [0.0, 28.0, 15.5], [0.0, 0.0, 1.0]])


def camera(n: int = 2) -> torch.Tensor:
    return K1.expand(n, 3, 3).clone()


def make(regularizer: dict | None = None, seed: int = 0, **options):
    torch.manual_seed(seed)
    extra = {"regularizer3d": regularizer} if regularizer is not None else {}
    return create_model(backbone={"name": "test_resnet"}, decoder=options.pop("decoder", "hps"), tasks=TASKS,
                        decoder_options=options, **extra)


# ---------------------------------------------------------------- volume rendering
def test_constant_density_gives_the_exponential_opacity():
    sigma, near, far, s = 0.7, 0.5, 4.0, 64
    t = torch.linspace(near, far, s, dtype=torch.float64).expand(3, s)
    w = R.render_weights(torch.full((3, s), sigma, dtype=torch.float64), t)
    cumulative = torch.cumsum(w, -1)
    # the weights of the samples before t_k add up to the opacity of [near, t_k]: 1 - exp(-sigma (t_k - near))
    for k in (1, 10, 40, s - 1):
        assert cumulative[0, k - 1].item() == pytest.approx(1 - math.exp(-sigma * (t[0, k].item() - near)), abs=1e-12)
    assert w[0, -1].item() == pytest.approx(math.exp(-sigma * (far - near)), abs=1e-12)  # the opaque far plane
    assert torch.allclose(w.sum(-1), torch.ones(3, dtype=torch.float64))
    open_far = R.render_weights(torch.full((3, s), sigma, dtype=torch.float64), t, opaque_far=False)
    assert open_far.sum(-1)[0].item() == pytest.approx(1 - math.exp(-sigma * (far - near)), abs=1e-12)


def test_three_samples_by_hand():
    sigma = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64)
    w = R.render_weights(sigma, t)
    want = [1 - math.exp(-0.5), math.exp(-0.5) * (1 - math.exp(-2.0)), math.exp(-2.5)]
    assert w.tolist() == pytest.approx(want, abs=1e-12)
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert R.composite(w, values).tolist() == pytest.approx([want[0] + 2 * want[2], want[1] + 2 * want[2]], abs=1e-12)


def test_a_step_density_puts_the_depth_at_the_step():
    t = torch.linspace(1.0, 5.0, 41)  # 0.1 m apart
    step = 2.3
    sigma = torch.where(t >= step - 1e-6, torch.tensor(1e4), torch.tensor(0.0))
    w = R.render_weights(sigma, t)
    assert (w * t).sum().item() == pytest.approx(step, abs=1e-4)
    assert w[t < step - 1e-6].abs().max().item() == 0.0  # free space in front of the surface renders nothing


# ---------------------------------------------------------------- rays and the tri-plane
def test_rays_go_back_through_their_pixels():
    K = torch.tensor([[[50.0, 0.0, 30.2], [0.0, 40.0, 20.7], [0.0, 0.0, 1.0]]])
    d = R.pixel_rays(K, (32, 48), (8, 12))  # cells of 4 x 4 pixels
    assert torch.allclose(d[..., 2], torch.ones(1, 8, 12))
    projected = torch.einsum("ij,nhwj->nhwi", K[0], d * 3.0)  # any point on the ray
    u, v = projected[..., 0] / projected[..., 2], projected[..., 1] / projected[..., 2]
    # cell (i, j) is centred on image pixel (4 j + 1.5, 4 i + 1.5)
    assert torch.allclose(u[0, 2, 5], torch.tensor(21.5), atol=1e-4) and torch.allclose(v[0, 2, 5], torch.tensor(9.5), atol=1e-4)
    assert d[0, 0, 0, 0].item() == pytest.approx((1.5 - 30.2) / 50.0, abs=1e-6)


def test_the_box_holds_the_frustum():
    low, high = R.frustum_box(K1[None], (32, 40), 0.5, 8.0)
    assert low[0].tolist() == pytest.approx([(-0.5 - 19.5) / 30 * 8, (-0.5 - 15.5) / 28 * 8, 0.5], abs=1e-5)
    assert high[0].tolist() == pytest.approx([(39.5 - 19.5) / 30 * 8, (31.5 - 15.5) / 28 * 8, 8.0], abs=1e-5)
    corner = torch.tensor([[[(39.5 - 19.5) / 30 * 8, 0.0, 0.5]]])
    assert R.normalise_points(corner, low, high)[0, 0].tolist() == pytest.approx([1.0, 2 * (0 - low[0, 1].item()) / (high[0, 1] - low[0, 1]).item() - 1, -1.0], abs=1e-5)


def test_triplane_sampling_of_known_planes():
    h, w = 4, 6
    planes = torch.zeros(1, 3, 2, h, w)
    planes[0, 0, 0] = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)  # xy plane, channel 0: its column
    planes[0, 1, 1] = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)  # xz plane, channel 1: its row (z)
    planes[0, 2, 1] = 10.0  # yz plane: a constant on channel 1
    coords = torch.tensor([[[0.0, 0.3, -0.5], [-0.5, -0.6, 0.25], [2.0, 0.0, 0.0]]])  # all inside the planes but the last
    f = R.sample_triplane(planes, coords)
    # align_corners=False: a normalised coordinate g lands on column (g + 1) w / 2 - 0.5
    col = lambda g, n: (g + 1) * n / 2 - 0.5  # noqa: E731
    assert f[0, 0].tolist() == pytest.approx([col(0.0, w), col(-0.5, h) + 10.0], abs=1e-5)
    assert f[0, 1].tolist() == pytest.approx([col(-0.5, w), col(0.25, h) + 10.0], abs=1e-5)
    assert f[0, 2, 0].item() == 0.0  # outside the planes: zero
    edge = R.sample_triplane(planes, torch.tensor([[[0.0, -0.9, 0.0]]]))  # 0.3 of a row beyond the first: blended with zero padding
    assert edge[0, 0, 0].item() == pytest.approx(0.7 * col(0.0, w), abs=1e-5)


def test_stratified_depths_stay_in_their_bins():
    torch.manual_seed(0)
    t = R.sample_depths(0.5, 4.5, 8, (3, 5), stratified=True)
    edges = torch.linspace(0.5, 4.5, 9)
    assert ((t >= edges[:-1]) & (t <= edges[1:])).all() and t.shape == (3, 5, 8)
    assert R.sample_depths(0.5, 4.5, 8, (2,), stratified=False)[0].tolist() == pytest.approx(torch.linspace(0.5, 4.5, 8).tolist())


# ---------------------------------------------------------------- the wrapper
def test_training_forward_adds_one_rendered_map_per_task():
    model = make({})
    assert isinstance(model, ThreeDAwareModel)
    model.train()
    x = torch.randn(2, 3, 32, 40)
    out = model(x, intrinsics=camera())
    plain = make(None)(x)
    for t in TASKS:
        assert len(out.deep_supervision[t]) == len(plain.deep_supervision.get(t, [])) + 1
    depth = out.deep_supervision["depth"][-1]
    assert depth.shape == (2, 1, 8, 10) and (depth >= 0.1).all() and (depth <= 10.0).all()  # expected depth within [near, far]
    assert out.deep_supervision["semseg"][-1].shape == (2, 5, 8, 10)
    # the rendered maps are trained: every regulariser parameter gets a gradient
    sum(v[-1].float().mean() for v in out.deep_supervision.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.regularizer3d.parameters())
    out2 = model(x, tasks=["normals"], intrinsics=camera())
    assert set(out2.deep_supervision) == {"normals"}


def test_no_inference_cost():
    model, plain = make({}, seed=3), make(None, seed=3)
    # the wrapper builds the decoder first, from the same random state: identical decoder weights
    for (k, a), (k2, b) in zip(model.decoder.state_dict().items(), plain.decoder.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    model.eval()
    plain.eval()
    called = []
    for m in model.regularizer3d.modules():
        m.register_forward_hook(lambda *a: called.append(1))
    x = torch.randn(2, 3, 32, 40)
    out, ref = model(x, intrinsics=camera()), plain(x)
    assert not called
    for t in TASKS:
        assert torch.equal(out.predictions[t], ref.predictions[t])
    assert out.deep_supervision == ref.deep_supervision == {}
    sum(v.sum() for v in out.predictions.values()).backward()
    used = {n for n, p in model.named_parameters() if p.grad is not None}
    sum(v.sum() for v in ref.predictions.values()).backward()
    assert used == {n for n, p in plain.named_parameters() if p.grad is not None}  # same names: decoder.*
    assert not any(n.startswith("regularizer3d.") for n in used)


def test_the_pretrained_folder_is_the_plain_model(tmp_path):
    import mtvision

    model = make({})
    model.save_pretrained(tmp_path / "m")
    predictor = mtvision.load(tmp_path / "m")
    assert type(predictor.model) is MultiTaskModel and predictor.model.config.regularizer3d is None
    loaded = {k: v for k, v in predictor.model.state_dict().items()}
    assert loaded.keys() == model.inference_model().state_dict().keys()
    assert not any(k.startswith("regularizer3d.") for k in loaded)


def test_parameters_split_into_shared_and_task_parts():
    model = make({})
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS}
    every = {id(p) for p in model.parameters()}
    assert shared | set().union(*per_task.values()) == every
    assert not shared & set().union(*per_task.values())
    assert {id(p) for p in model.regularizer3d.heads["semseg"].parameters()} <= per_task["semseg"]
    assert {id(p) for p in model.regularizer3d.density.parameters()} <= shared
    assert "depth" not in model.regularizer3d.heads  # rendered from the density


def test_it_plugs_into_another_decoder():
    model = make({"samples": 8}, decoder="invpt", task_channels=32, prediction_channels=16)
    model.train()
    out = model(torch.randn(2, 3, 64, 64), intrinsics=camera())
    plain = make(None, decoder="invpt", task_channels=32, prediction_channels=16)
    plain.train()
    ref = plain(torch.randn(2, 3, 64, 64))
    assert all(len(out.deep_supervision[t]) == len(ref.deep_supervision.get(t, [])) + 1 for t in TASKS)
    # InvPT pads 64 x 80 inputs to 64 x 128: its stride-8 maps are 8 x 16, the rays tile the image 8 x 10
    padded = model(torch.randn(2, 3, 64, 80), intrinsics=camera())
    assert padded.deep_supervision["depth"][-1].shape == (2, 1, 8, 10)


def test_the_render_grid_covers_the_image_at_the_feature_stride():
    assert render_grid((32, 40), (8, 10)) == (8, 10)
    assert render_grid((128, 160), (16, 24)) == (16, 20)  # features of an input padded to 128 x 192
    assert render_grid((30, 41), (8, 11)) == (8, 11)  # odd sizes: ceil


def test_missing_intrinsics_are_a_clear_error():
    model = make({})
    model.train()
    with pytest.raises(IntrinsicsError, match="needs each training sample's camera intrinsics.*data.assumed_hfov"):
        model(torch.randn(2, 3, 32, 40))
    objective = build_objective(model, list(TASKS), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    batch = {"image": torch.randn(2, 3, 32, 40), "semseg": torch.zeros(2, 32, 40, dtype=torch.long),
             "depth": torch.ones(2, 1, 32, 40), "normals": torch.ones(2, 3, 32, 40), "edge": torch.zeros(2, 1, 32, 40),
             "meta": [{"id": "a"}, {"id": "b"}]}
    with pytest.raises(IntrinsicsError, match="training batch.*model.regularizer3d: null"):
        objective.step(model, [batch], 0)
    batch["meta"] = [{"id": i, "intrinsics": K1.numpy().astype(np.float64)} for i in "ab"]
    record = objective.step(model, [batch], 0)  # with the camera, the same step trains
    assert record.stepped and set(record.losses) == set(TASKS)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="near < far"):
        make({"near": 2.0, "far": 1.0})
    with pytest.raises(ConfigError, match="regularizer3d"):
        make({"sampels": 8})
