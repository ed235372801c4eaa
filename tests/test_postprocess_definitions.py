"""Post-processing against its definition: cDDPM's evaluation steps written out directly
(per-slice 2D erosion with a cross, 3D median filter, 26-connected components by skimage's
``filled_area``) on small random volumes, plus the hand-made shapes that tell the
alternatives apart (element shape, 2D vs 3D, connectivity, holes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from brainuad.evaluation.postprocess import (
    PostprocessConfig,
    binarise,
    erode_brainmask,
    postprocess_map,
    remove_small_components,
)

CROSS_2D = ndimage.generate_binary_structure(2, 1)


def reference_eroded_mask(brainmask: np.ndarray, iterations: int) -> np.ndarray:
    """cDDPM ``apply_brainmask_volume``: each slice eroded on its own with a 2D cross."""
    return np.stack(
        [
            ndimage.binary_erosion(s > 0, structure=CROSS_2D, iterations=iterations)
            for s in brainmask
        ]
    )


def reference_components(binary: np.ndarray, max_voxels: int) -> np.ndarray:
    """cDDPM ``filter_3d_connected_components``: skimage labels, connectivity 3, filled_area."""
    labels = measure.label(binary, connectivity=3)
    out = binary.copy()
    for region in measure.regionprops(labels):
        if region.area_filled <= max_voxels:
            out[labels == region.label] = False
    return out


def blob_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth, irregular brain-like mask (not a box), different in every slice."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.0, 3.0, 3.0))
    return field > -0.1 * field.std()


def test_erosion_is_per_slice_with_a_2d_cross():
    rng = np.random.default_rng(0)
    mask = blob_mask(rng, (6, 50, 50))
    cfg = PostprocessConfig()  # auto: 50 // 25 = 2 iterations
    assert np.array_equal(erode_brainmask(mask, cfg), reference_eroded_mask(mask, 2))
    # Not a 3D erosion: a single-slice mask survives in-plane erosion away from its edges.
    single = np.zeros((3, 25, 25), dtype=bool)
    single[1, 5:20, 5:20] = True
    eroded = erode_brainmask(single, PostprocessConfig(erode_iterations=1))
    expected = np.zeros_like(single)
    expected[1, 6:19, 6:19] = True  # a cross removes one pixel per side
    assert np.array_equal(eroded, expected)


def test_erosion_element_is_a_cross_not_a_square():
    # A square corner loses only the corner pixel's 4-neighbours under a cross: the diagonal
    # pixel inside a notch survives a cross, not a 3x3 square.
    mask = np.ones((1, 10, 10), dtype=bool)
    mask[0, 0:5, 0:5] = False  # notch in the top-left quadrant
    out = erode_brainmask(mask, PostprocessConfig(erode_iterations=1))
    assert out[0, 5, 5]  # diagonal neighbour of the notch corner (4, 4): kept by a cross
    assert not out[0, 5, 4] and not out[0, 4, 5]
    assert np.array_equal(out, reference_eroded_mask(mask, 1))


def test_erosion_iterations_and_border():
    assert PostprocessConfig().iterations_for(96) == 3
    assert PostprocessConfig().iterations_for(100) == 4
    assert PostprocessConfig().iterations_for(24) == 0
    assert PostprocessConfig(erode_iterations=2).iterations_for(96) == 2
    # Pixels at the image border count as outside (border_value=0).
    full = np.ones((2, 8, 8), dtype=bool)
    out = erode_brainmask(full, PostprocessConfig(erode_iterations=1))
    assert out.sum() == 2 * 6 * 6 and not out[:, 0].any() and not out[:, :, -1].any()
    # 0 iterations keep the mask as it is (scipy alone would erode until nothing is left).
    mask = np.zeros((2, 8, 8))
    mask[:, 2:6, 2:6] = 3.0
    kept = erode_brainmask(mask, PostprocessConfig(erode_iterations=0))
    assert kept.dtype == bool and np.array_equal(kept, mask > 0)
    # apply_brainmask False: the whole volume is evaluated.
    whole = erode_brainmask(mask, PostprocessConfig(apply_brainmask=False))
    assert whole.dtype == bool and whole.all() and whole.shape == mask.shape


def test_postprocess_map_matches_the_reference_pipeline():
    rng = np.random.default_rng(1)
    mask = blob_mask(rng, (7, 30, 30))
    amap = rng.random((7, 30, 30)).astype(np.float64)
    cfg = PostprocessConfig(erode_iterations=1, median_kernel=3)
    eroded = reference_eroded_mask(mask, 1)
    # the 3D cubic median filter (reflect boundary) of the masked map, masked again
    expected = ndimage.median_filter(amap * eroded, size=3, mode="reflect") * eroded
    out = postprocess_map(amap, mask, cfg)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=0, atol=1e-7)
    # Not per slice: a 2D median would differ on this map.
    per_slice = np.stack([ndimage.median_filter(s, size=3) for s in amap * eroded]) * eroded
    assert not np.allclose(out, per_slice)


def test_median_filter_is_3d_and_re_masked():
    # One bright slab three slices thick: a 3D 3x3x3 median keeps its middle slice bright
    # only if it looks across slices; values do not leak outside the mask.
    amap = np.zeros((5, 12, 12), dtype=np.float32)
    amap[2, :, :] = 1.0  # a single bright slice: a 3D median (3 slices) removes it
    mask = np.zeros((5, 12, 12), dtype=bool)
    mask[:, 2:10, 2:10] = True
    cfg = PostprocessConfig(erode_iterations=0, median_kernel=3)
    assert postprocess_map(amap, mask, cfg).max() == 0.0  # per-slice median would keep it
    # leak: a one-voxel gap in the mask inside a bright region is filled by the median of
    # its bright neighbours; re-masking zeroes it again
    gap = mask.copy()
    gap[:, 5, 5] = False
    bright = np.ones((5, 12, 12), dtype=np.float32)
    out = postprocess_map(bright, gap, cfg)
    assert out[:, 5, 5].max() == 0.0 and out[:, ~mask[0]].max() == 0.0
    assert out[2, 6, 6] == 1.0
    # median_kernel 1 or 0: no filter at all
    noisy = np.random.default_rng(2).random((5, 12, 12)).astype(np.float32)
    for k in (0, 1):
        out = postprocess_map(noisy, mask, PostprocessConfig(erode_iterations=0, median_kernel=k))
        np.testing.assert_array_equal(out, noisy * mask)


def test_postprocess_map_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"anomaly map .* and brain mask .* differ"):
        postprocess_map(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), PostprocessConfig())


def test_components_match_skimage_filled_area_on_random_volumes():
    rng = np.random.default_rng(3)
    for density, max_voxels in ((0.15, 7), (0.3, 7), (0.35, 30), (0.2, 3)):
        binary = rng.random((6, 14, 14)) < density
        expected = reference_components(binary, max_voxels)
        assert np.array_equal(remove_small_components(binary, max_voxels), expected)


def test_components_are_26_connected_and_size_bound_inclusive():
    binary = np.zeros((3, 3, 10), dtype=bool)
    binary[0, 0, 0:4] = True  # 4 voxels
    binary[1, 1, 4:8] = True  # 4 more, touching the first only at a corner (26-connected)
    assert remove_small_components(binary, 7).sum() == 8  # one component of 8 > 7: kept
    assert remove_small_components(binary, 8).sum() == 0  # <= 8: dropped
    seven = np.zeros((3, 9, 9), dtype=bool)
    seven[1, 1, 1:8] = True
    assert not remove_small_components(seven, 7).any()
    assert remove_small_components(seven, 6).sum() == 7


def test_components_holes_count_towards_the_size():
    shell = np.ones((5, 5, 5), dtype=bool)  # 3x3x3 hollow cube inside: 26 voxels + 1 hole
    shell[:] = False
    shell[1:4, 1:4, 1:4] = True
    shell[2, 2, 2] = False
    assert shell.sum() == 26
    assert remove_small_components(shell, 26).sum() == 26  # filled 27 > 26: kept
    assert not remove_small_components(shell, 27).any()
    # a 26-voxel component without a hole is dropped at 26
    bar = np.zeros((3, 3, 30), dtype=bool)
    bar[1, 1, 2:28] = True
    assert not remove_small_components(bar, 26).any()
    # 0 turns the filter off; an empty input comes back empty, as bool
    speck = np.zeros((3, 3, 3), dtype=np.uint8)
    speck[1, 1, 1] = 1
    out = remove_small_components(speck, 0)
    assert out.dtype == bool and out.sum() == 1


def test_binarise_is_strictly_greater_then_drops_small_components():
    amap = np.zeros((3, 10, 10), dtype=np.float32)
    amap[1, 2:5, 2:5] = 0.5  # 9 voxels at exactly the threshold: not above it
    amap[1, 6, 6] = 0.9  # a single voxel: too small
    assert not binarise(amap, 0.5, PostprocessConfig()).any()
    out = binarise(amap, 0.4, PostprocessConfig())
    assert out.dtype == bool and out.sum() == 9 and not out[1, 6, 6]
    assert binarise(amap, 0.4, PostprocessConfig(min_component_voxels=0)).sum() == 10


def test_config_validation_and_round_trip():
    for bad in ({"erode_iterations": -1}, {"erode_iterations": "three"}):
        with pytest.raises(ValueError, match="erode_iterations: expected 'auto' or an int >= 0"):
            PostprocessConfig(**bad)
    for bad in ({"median_kernel": -1}, {"min_component_voxels": -1}):
        with pytest.raises(ValueError, match="median_kernel and min_component_voxels must be"):
            PostprocessConfig(**bad)
    PostprocessConfig(erode_iterations=0, median_kernel=0, min_component_voxels=0)
    cfg = PostprocessConfig(erode_iterations=2, median_kernel=3, min_component_voxels=4)
    assert cfg.to_dict() == {
        "erode_iterations": 2,
        "median_kernel": 3,
        "min_component_voxels": 4,
        "apply_brainmask": True,
    }
    assert PostprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PostprocessConfig.from_dict(None) == PostprocessConfig()
    assert PostprocessConfig() == PostprocessConfig("auto", 5, 7, True)


def test_auto_erosion_counts_the_slice_width():
    # W // 25 with W the last axis (width): 50 // 25 = 2 erosions, not 30 // 25 = 1
    mask = np.ones((1, 30, 50), dtype=bool)
    assert erode_brainmask(mask, PostprocessConfig()).sum() == (30 - 4) * (50 - 4)


def test_median_kernel_two_is_a_filter():
    amap = np.random.default_rng(4).random((4, 9, 9)).astype(np.float32)
    mask = np.ones((4, 9, 9), dtype=bool)
    out = postprocess_map(amap, mask, PostprocessConfig(erode_iterations=0, median_kernel=2))
    np.testing.assert_array_equal(out, ndimage.median_filter(amap, size=2))


def test_components_hole_filling_and_labels_in_a_crowd():
    # A 26-voxel shell (label 1: first in raster order) next to a small speck (label 2): the
    # shell's own bounding box decides its filled size, 27 > 26, so it stays.
    binary = np.zeros((5, 5, 9), dtype=bool)
    binary[1:4, 1:4, 1:4] = True
    binary[2, 2, 2] = False
    binary[2, 2, 7] = True
    out = remove_small_components(binary, 26)
    assert out.sum() == 26 and not out[2, 2, 7]
    # A background voxel that reaches the box border only diagonally is no hole under
    # 26-connectivity (a 6-connected fill would count it): filled size 34 <= 34, dropped.
    block = np.zeros((5, 5, 6), dtype=bool)
    block[1:4, 1:4, 1:5] = True
    block[2, 2, 2] = False  # centre
    block[1, 1, 1] = False  # the box corner diagonal to it
    assert block.sum() == 34
    assert not remove_small_components(block, 34).any()
    assert np.array_equal(remove_small_components(block, 34), reference_components(block, 34))
    assert remove_small_components(block, 33).sum() == 34
    # max_voxels 1: single voxels go, pairs stay
    pairs = np.zeros((3, 3, 9), dtype=bool)
    pairs[1, 1, 1] = True
    pairs[1, 1, 5:7] = True
    assert remove_small_components(pairs, 1).sum() == 2


def test_error_messages_name_the_values():
    with pytest.raises(
        ValueError, match=r"^anomaly map \(2, 4, 4\) and brain mask \(2, 4, 5\) differ$"
    ):
        postprocess_map(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), PostprocessConfig())
    with pytest.raises(
        ValueError,
        match=r"^PostprocessConfig.median_kernel and min_component_voxels must be >= 0, got -1, 7$",
    ):
        PostprocessConfig(median_kernel=-1)
    with pytest.raises(
        ValueError,
        match=r"^PostprocessConfig.erode_iterations: expected 'auto' or an int >= 0, got -2$",
    ):
        PostprocessConfig(erode_iterations=-2)
