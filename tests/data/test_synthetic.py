import numpy as np
import pytest
import torch

from mtvision.data import synthetic as S
from mtvision.errors import DatasetError, UnknownNameError


def _render(index, h=48, w=64, seed=3):
    rng = np.random.default_rng([seed, index])
    scene = S.make_scene(rng)
    cam = S.make_camera(rng, scene, h, w)
    return scene, cam, S.render(scene, cam, h, w, rng)


def _world_points(cam, depth):
    h, w = depth.shape
    vs, us = np.mgrid[0:h, 0:w].astype(np.float32)
    d_cam = np.stack([(us - cam.cx) / cam.fx, (vs - cam.cy) / cam.fy, np.ones_like(us)]) * depth
    return cam.position[:, None, None] + np.einsum("ij,jhw->ihw", cam.rotation, d_cam)


def test_deterministic_in_seed_and_index():
    a, b = S.generate(0, 7), S.generate(0, 7)
    for key in ("image", "semseg", "depth", "normals", "edge", "saliency", "texture"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(S.generate(0, 8)["depth"], a["depth"])
    assert not np.array_equal(S.generate(1, 7)["depth"], a["depth"])


@pytest.mark.parametrize("index", range(4))
def test_room_geometry_is_exact(index):
    """Back-projected depth puts floor pixels at z = 0, ceiling pixels at z = room height, walls on walls."""
    scene, cam, view = _render(index)
    pts = _world_points(cam, view.depth)
    room = scene.room
    floor = view.semseg == S.FLOOR
    ceiling = view.semseg == S.CEILING
    assert floor.any()
    np.testing.assert_allclose(pts[2][floor], 0.0, atol=2e-3)
    np.testing.assert_allclose(pts[2][ceiling], room[2], atol=2e-3)
    wall = (view.semseg == S.WALL) & (view.instance < 6)
    on_wall = np.minimum.reduce([np.abs(pts[0]), np.abs(pts[0] - room[0]), np.abs(pts[1]), np.abs(pts[1] - room[1])])
    assert np.abs(on_wall[wall]).max(initial=0.0) < 2e-3


@pytest.mark.parametrize("index", range(4))
def test_normals_are_unit_face_the_camera_and_match_world_up(index):
    scene, cam, view = _render(index)
    n = view.normals_cam  # 3 x H x W camera frame
    np.testing.assert_allclose(np.linalg.norm(n, axis=0), 1.0, atol=1e-4)
    h, w = view.depth.shape
    vs, us = np.mgrid[0:h, 0:w].astype(np.float32)
    rays = np.stack([(us - cam.cx) / cam.fx, (vs - cam.cy) / cam.fy, np.ones_like(us)])
    assert ((n * rays).sum(0) < 1e-4).mean() > 0.999  # visible surfaces face the camera
    floor = view.semseg == S.FLOOR
    up_cam = cam.rotation.T @ np.array([0, 0, 1], np.float32)
    np.testing.assert_allclose(n[:, floor].T, np.broadcast_to(up_cam, (floor.sum(), 3)), atol=1e-5)


def test_sphere_depth_matches_analytic_surface():
    """Every pixel labelled as a ball lies on its sphere's surface."""
    for index in range(40):
        scene, cam, view = _render(index)
        balls = [p for p in scene.primitives if p.kind == "sphere"]
        for ball in balls:
            mask = view.instance == ball.instance_id
            if mask.sum() < 5:
                continue
            pts = _world_points(cam, view.depth)[:, mask]
            dist = np.linalg.norm(pts - ball.center[:, None], axis=0)
            np.testing.assert_allclose(dist, ball.size[0], atol=2e-3)
            return
    pytest.fail("no visible ball in 40 scenes")


def test_boundaries_mark_instance_changes_and_nothing_inside_flat_faces():
    depth = np.ones((6, 6), np.float32)
    normals = np.zeros((3, 6, 6), np.float32)
    normals[2] = -1
    inst = np.zeros((6, 6), np.int64)
    inst[:, 3:] = 1
    edge = S.boundaries(depth, normals, inst)
    expected = np.zeros((6, 6), np.float32)
    expected[:, 2] = 1  # the pixel left of the change is marked
    np.testing.assert_array_equal(edge, expected)
    depth[4:, :] = 2.0  # a depth jump between rows 3 and 4
    edge = S.boundaries(depth, normals, np.zeros_like(inst))
    assert edge[3].all() and edge.sum() == 6
    normals2 = normals.copy()
    normals2[:, :, 5] = np.array([1.0, 0, 0])[:, None]  # a 90 degree crease before column 5
    edge = S.boundaries(np.ones((6, 6), np.float32), normals2, np.zeros_like(inst))
    assert edge[:, 4].all() and edge.sum() == 6


def test_labels_are_consistent_with_each_other():
    s = S.generate(0, 3)
    np.testing.assert_array_equal(s["saliency"] == 1, np.isin(s["semseg"], S.SALIENT_CLASSES))
    assert s["depth"].min() > 0 and np.isfinite(s["depth"]).all()
    assert set(np.unique(s["edge"])) <= {0.0, 1.0}
    assert s["semseg"].max() < len(S.CLASS_NAMES)


def test_views_show_furniture_and_all_classes_appear():
    salient_fraction = []
    seen = set()
    for index in range(40):
        s = S.generate(5, index, 48, 64)
        salient_fraction.append(s["saliency"].mean())
        seen |= set(np.unique(s["semseg"]).tolist())
    assert np.mean(np.asarray(salient_fraction) > 0.02) >= 0.9, "cameras must look at the furniture"
    assert len(seen) >= 8


def test_colour_alone_does_not_give_the_class_away():
    """Even the best colour -> class lookup, fitted on the very pixels it is scored on, is far from perfect."""
    colours, labels = [], []
    for index in range(30):
        s = S.generate(1, index, 48, 64)
        colours.append((s["image"] // 32).reshape(-1, 3))
        labels.append(s["semseg"].ravel())
    c = np.concatenate(colours).astype(np.int64)
    y = np.concatenate(labels).astype(np.int64)
    key = c[:, 0] * 64 + c[:, 1] * 8 + c[:, 2]
    counts = np.zeros((512, len(S.CLASS_NAMES)))
    np.add.at(counts, (key, y), 1)
    per_class_correct = np.zeros(len(S.CLASS_NAMES))
    best = counts.argmax(1)
    for k in range(512):
        per_class_correct[best[k]] += counts[k, best[k]]
    recall = per_class_correct / np.maximum(counts.sum(0), 1)
    present = counts.sum(0) > 0
    assert recall[present].mean() < 0.6


def test_texture_is_visible_in_the_image_but_unrelated_to_the_class():
    """The texture task (accent-colour mask) is learnable from colour within a surface, yet knowing
    the class of a pixel predicts it no better than the majority label."""
    accuracies, textures, classes = [], [], []
    for index in range(30):
        scene, _, view = _render(index, seed=4)
        image, label, instance = view.image.reshape(-1, 3).astype(np.float64), view.accent.ravel(), view.instance.ravel()
        textures.append(label)
        classes.append(view.semseg.ravel())
        for i in np.unique(instance):
            mask, y = instance == i, label[instance == i]
            base, accent = scene.textures[0:3, i], scene.textures[3:6, i]
            if min(y.sum(), (~y).sum()) < 30 or np.linalg.norm(base - accent) < 0.2:
                continue
            chroma = image[mask] / np.maximum(image[mask].sum(1, keepdims=True), 1)
            near_accent = ((chroma - chroma[y].mean(0)) ** 2).sum(1) < ((chroma - chroma[~y].mean(0)) ** 2).sum(1)
            accuracies.append((near_accent == y).mean())
    assert len(accuracies) > 30 and np.mean(accuracies) > 0.75
    t, c = np.concatenate(textures), np.concatenate(classes)
    majority = max(t.mean(), 1 - t.mean())
    per_class_majority = sum(max(t[c == k].sum(), (~t[c == k]).sum()) for k in np.unique(c)) / len(t)
    assert per_class_majority < majority + 0.03
    s = S.generate(0, 3)
    assert s["texture"].dtype == np.uint8 and set(np.unique(s["texture"])) == {0, 1}


def test_any_resolution():
    s = S.generate(0, 0, 37, 53)
    assert s["image"].shape == (37, 53, 3) and s["normals"].shape == (37, 53, 3)
    assert s["depth"].shape == (37, 53)


def test_dataset_contract_and_task_subsets():
    assert S.SyntheticScenes(1).tasks == ("semseg", "depth", "normals", "edge", "saliency")  # texture only on request
    assert set(S.SyntheticScenes(1, 16, 16, tasks=["texture"])[0]) == {"image", "texture", "meta"}
    ds = S.SyntheticScenes(3, 32, 40, seed=2, tasks=["depth", "semseg"])
    assert len(ds) == 3
    sample = ds[1]
    assert set(sample) == {"image", "depth", "semseg", "meta"}
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 32, 40)
    assert sample["semseg"].dtype == torch.int64 and sample["semseg"].shape == (32, 40)
    assert sample["depth"].shape == (1, 32, 40)
    raw = S.generate(2, 1, 32, 40)
    np.testing.assert_array_equal(sample["depth"][0].numpy(), raw["depth"])
    assert ds.task_specs()["semseg"].out_channels == len(S.CLASS_NAMES)
    with pytest.raises(IndexError):
        ds[3]


def test_dataset_bad_input():
    with pytest.raises(UnknownNameError, match="did you mean 'semseg'"):
        S.SyntheticScenes(2, tasks=["semseq"])
    with pytest.raises(DatasetError, match="cannot provide task 'parts'"):
        S.SyntheticScenes(2, tasks=["parts"])
    with pytest.raises(ValueError, match="num_samples"):
        S.SyntheticScenes(0)
