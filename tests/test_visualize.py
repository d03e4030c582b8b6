import numpy as np

from mtvision import visualize as V
from mtvision.cv import cv2


def test_palette_is_distinct_and_ignore_is_black():
    palette = V.label_palette(256)
    assert len({tuple(c) for c in palette}) == 256
    rgb = V.colorize_labels(np.array([[0, 1, 255]]))
    assert rgb[0, 2].tolist() == [0, 0, 0]
    assert rgb[0, 0].tolist() != [0, 0, 0] and rgb[0, 0].tolist() != rgb[0, 1].tolist()


def test_depth_colours_invalid_black_and_near_differs_from_far():
    rgb = V.colorize_depth(np.array([[0.0, 1.0, 5.0]]))
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() != rgb[0, 2].tolist()
    assert V.colorize_depth(np.zeros((2, 2))).max() == 0


def test_normals_map_to_rgb_and_invalid_to_black():
    n = np.array([[[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    rgb = V.colorize_normals(n)
    assert rgb[0, 0].tolist() == [255, 128, 0]
    assert rgb[0, 1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(V.colorize_normals(n.transpose(2, 0, 1)), rgb)


def test_probability_and_grid(tmp_path):
    rgb = V.colorize_probability(np.array([[0.0, 0.5, 1.0, 255.0]]))
    inferno = cv2.applyColorMap(np.array([[0, 128, 255]], np.uint8), cv2.COLORMAP_INFERNO)[0, :, ::-1]  # OpenCV's BGR
    assert rgb[0, :3].tolist() == inferno.tolist() and rgb[0, 3].tolist() == [128, 128, 128]  # ignored: mid grey
    assert rgb[0, 0].sum() < 20 and rgb[0, 2].min() > 150  # black to pale yellow
    tile = np.full((4, 5, 3), 7, np.uint8)
    grid = V.image_grid([[tile, tile], [tile]], pad=1)
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 6, 3)
    assert (grid[1:5, 1:6] == 7).all() and (grid[6:10, 7:12] == 255).all()
    V.save_png(str(tmp_path / "g.png"), grid)
    assert (tmp_path / "g.png").stat().st_size > 0
