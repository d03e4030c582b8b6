import numpy as np
from scipy import ndimage

from mtvision.metrics.thinning import _LUT_FIRST, _LUT_SECOND, _NEIGHBOURS, _deletion_mask, thin

EIGHT = np.ones((3, 3), dtype=bool)


def test_one_pixel_lines_are_unchanged():
    a = np.zeros((10, 12), bool)
    a[4, 1:11] = True
    a[1:9, 2] = True
    np.fill_diagonal(a[:, 1:], True)
    a = thin(a)  # whatever junction cleanup happens once, the result is a fixed point
    assert np.array_equal(thin(a), a)
    line = np.zeros((10, 12), bool)
    line[4, 1:11] = True
    assert np.array_equal(thin(line), line)


def test_bar_becomes_centre_line():
    a = np.zeros((12, 20), bool)
    a[3:8, 2:18] = True
    out = thin(a)
    assert out.sum(axis=0).max() == 1  # one pixel per column
    assert set(np.nonzero(out)[0]) == {5}  # the centre row of rows 3..7


def test_subset_idempotent_topology_preserving_and_stack_equals_slices():
    rng = np.random.default_rng(1)
    maps = ndimage.binary_dilation(rng.random((4, 30, 30)) > 0.93, iterations=2)
    out = thin(maps)
    assert not (out & ~maps).any()
    assert np.array_equal(thin(out), out)
    for m, o in zip(maps, out):
        assert np.array_equal(thin(m), o)
        assert ndimage.label(m, EIGHT)[1] == ndimage.label(o, EIGHT)[1]  # components kept
        # holes kept: 4-connected background components, outside the image counting as background
        assert ndimage.label(~np.pad(m, 1))[1] == ndimage.label(~np.pad(o, 1))[1]


def test_ring_stays_a_ring():
    a = np.zeros((9, 9), bool)
    a[1:8, 1:8] = True
    a[3:6, 3:6] = False
    out = thin(a)
    assert ndimage.label(~out)[1] == 2 and out.sum() < a.sum()


def test_bitwise_deletion_rule_equals_the_lookup_tables_for_all_neighbourhoods():
    # pixel c of row 1 at column 3c + 2 has neighbour code c; bits 1..7 of the image are unused maps
    img = np.zeros((3, 3 * 256 + 2), np.uint8)
    for code in range(256):
        img[1, 3 * code + 2] = 1
        for bit, (dr, dc) in enumerate(_NEIGHBOURS):
            img[1 + dr, 3 * code + 2 + dc] |= (code >> bit) & 1
    for second, lut in ((False, _LUT_FIRST), (True, _LUT_SECOND)):
        deleted = _deletion_mask(img, (1, 2, 1, 3 * 256 + 1), second)[0, 1::3]
        assert np.array_equal(deleted.astype(bool), lut)
    # bit k of every pixel is an independent map: maps in other bits do not interact
    stack = np.stack([np.roll(img[:, :60] > 0, k, axis=1) for k in range(8)])
    assert np.array_equal(thin(stack), np.stack([thin(m) for m in stack]))
