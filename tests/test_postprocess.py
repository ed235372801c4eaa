"""Post-processing of anomaly maps (cDDPM's recipe)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops

from brainuad.evaluation.postprocess import (
    PostprocessConfig,
    binarise,
    erode_brainmask,
    postprocess_map,
    remove_small_components,
)


@pytest.mark.parametrize(("width", "expected"), [(50, 2), (75, 3), (96, 3), (24, 0)])
def test_auto_erosion_is_width_over_25(width, expected):
    cfg = PostprocessConfig()
    assert cfg.iterations_for(width) == expected
    mask = np.ones((2, width, width), dtype=bool)
    eroded = erode_brainmask(mask, cfg)
    # A cross erosion of a full slice (outside the array counts as background) peels
    # `expected` pixels off every edge.
    want = np.zeros_like(mask)
    want[:, expected : width - expected, expected : width - expected] = True
    np.testing.assert_array_equal(eroded, want)


def test_erosion_is_per_slice_and_zero_iterations_keeps_mask():
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[1:, 5:15, 5:15] = True  # slice 0 empty: a 3D erosion would wipe slice 1
    eroded = erode_brainmask(mask, PostprocessConfig(erode_iterations=1))
    assert eroded[1].sum() == 8 * 8 and eroded[2].sum() == 8 * 8
    # scipy reads iterations=0 as "erode until nothing changes"; 0 must mean no erosion.
    np.testing.assert_array_equal(
        erode_brainmask(mask, PostprocessConfig(erode_iterations=0)), mask
    )
    assert erode_brainmask(mask, PostprocessConfig(apply_brainmask=False)).all()


def test_map_zeroed_outside_eroded_mask():
    rng = np.random.default_rng(0)
    amap = rng.random((4, 25, 25)).astype(np.float32) + 1
    mask = np.zeros_like(amap, dtype=bool)
    mask[:, 5:20, 5:20] = True
    cfg = PostprocessConfig(median_kernel=0)
    out = postprocess_map(amap, mask, cfg)
    eroded = erode_brainmask(mask, cfg)
    assert out.dtype == np.float32
    assert (out[~eroded] == 0).all()
    np.testing.assert_array_equal(out[eroded], amap[eroded])


def test_median_filter_removes_single_voxel_spike_and_keeps_blobs():
    amap = np.zeros((9, 20, 20), dtype=np.float32)
    amap[4, 10, 10] = 100.0
    amap[2:7, 2:7, 12:17] = 3.0  # 5 x 5 x 5 block: its centre survives a kernel-5 median
    mask = np.ones_like(amap, dtype=bool)
    out = postprocess_map(amap, mask, PostprocessConfig(erode_iterations=0))
    assert out[4, 10, 10] == 0
    assert out[4, 4, 14] == 3.0
    off = postprocess_map(amap, mask, PostprocessConfig(erode_iterations=0, median_kernel=1))
    np.testing.assert_array_equal(off, amap)


def _line(n: int, shape=(12, 12, 12)) -> np.ndarray:
    binary = np.zeros(shape, dtype=bool)
    binary[1, 1, 1 : 1 + n] = True
    return binary


def test_components_of_seven_removed_eight_kept():
    cfg = PostprocessConfig()
    assert not binarise(_line(7).astype(np.float32), 0.5, cfg).any()
    assert binarise(_line(8).astype(np.float32), 0.5, cfg).sum() == 8
    assert (
        binarise(_line(7).astype(np.float32), 0.5, PostprocessConfig(min_component_voxels=0)).sum()
        == 7
    )


def test_components_are_26_connected():
    binary = np.zeros((10, 10, 10), dtype=bool)
    for i in range(8):  # a 3D diagonal: only corner contacts
        binary[i, i, i] = True
    np.testing.assert_array_equal(remove_small_components(binary, 7), binary)


def _shell() -> np.ndarray:
    """A 3 x 3 x 3 cube without its centre: 26 voxels, 27 with the hole filled."""
    binary = np.zeros((7, 7, 7), dtype=bool)
    binary[2:5, 2:5, 2:5] = True
    binary[3, 3, 3] = False
    return binary


def test_filled_size_as_cddpm():
    shell = _shell()
    assert regionprops(label(shell, connectivity=3))[0].area_filled == 27
    assert remove_small_components(shell, 26).sum() == 26  # filled size 27 > 26: kept
    assert remove_small_components(shell, 27).sum() == 0


@pytest.mark.parametrize("max_voxels", [7, 27])
def test_components_match_skimage_recipe_on_random_volumes(max_voxels):
    rng = np.random.default_rng(1)
    for _ in range(3):
        binary = rng.random((10, 16, 16)) > 0.75
        binary[:7, :7, :7] = _shell()
        expected = binary.copy()
        labels = label(binary, connectivity=3)
        for prop in regionprops(labels):
            if prop.area_filled <= max_voxels:
                expected[labels == prop.label] = False
        np.testing.assert_array_equal(remove_small_components(binary, max_voxels), expected)


def test_binarise_is_strict():
    amap = np.full((1, 3, 3), 0.5, dtype=np.float32)
    assert not binarise(amap, 0.5, PostprocessConfig(min_component_voxels=0)).any()
    assert binarise(amap, 0.49, PostprocessConfig(min_component_voxels=0)).all()


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="erode_iterations"):
        PostprocessConfig(erode_iterations=-1)
    cfg = PostprocessConfig(erode_iterations=2, median_kernel=3)
    assert PostprocessConfig.from_dict(cfg.to_dict()) == cfg
