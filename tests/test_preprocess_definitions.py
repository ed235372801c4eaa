"""Normalisation and cropping against their definitions, by hand computation on tiny arrays:
the brain's p_low maps to 0 and p_high to 1 (numpy's linear percentiles of the brain only),
outside the brain is 0; the box is centred on the bounding box of a non-box-shaped mask and
every voxel of it is the source voxel its affine says."""

from __future__ import annotations

import numpy as np
import pytest

from brainuad.preprocess.crop import brain_box_centre, crop_or_pad
from brainuad.preprocess.normalise import percentile_normalise


def test_percentiles_map_to_zero_and_one_inside_the_brain_only():
    data = np.arange(1.0, 102.0).reshape(1, 1, 101)  # brain: 1..101; 1st pct 2, 99th 100
    mask = np.ones_like(data, dtype=bool)
    data = np.concatenate([data, np.full((1, 1, 101), 1000.0)], axis=0)  # bright non-brain
    mask = np.concatenate([mask, np.zeros_like(mask)], axis=0)
    out, low, high = percentile_normalise(data, mask, (1.0, 99.0))
    assert (low, high) == (2.0, 100.0)  # of the brain only: the 1000s do not count
    assert out.dtype == np.float32 and out.shape == data.shape
    brain = out[0, 0]
    assert brain[1] == 0.0 and brain[99] == 1.0  # p_low -> 0, p_high -> 1
    np.testing.assert_allclose(brain[50], (51.0 - 2.0) / 98.0, rtol=1e-6)  # linear between
    assert brain[0] == 0.0 and brain[100] == 1.0  # clipped below and above
    assert not out[1].any()  # outside the brain: 0, however bright


def test_percentiles_are_numpy_linear_and_other_levels():
    rng = np.random.default_rng(0)
    data = rng.gamma(2.0, 50.0, size=(4, 5, 6))
    mask = rng.random((4, 5, 6)) > 0.3
    out, low, high = percentile_normalise(data, mask, (5.0, 90.0))
    ref_low, ref_high = np.percentile(data[mask], [5.0, 90.0])
    assert (low, high) == (pytest.approx(ref_low), pytest.approx(ref_high))
    expected = np.where(mask, np.clip((data - ref_low) / (ref_high - ref_low), 0, 1), 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # the full range: min -> 0, max -> 1
    _, lo, hi = percentile_normalise(data, mask, (0.0, 100.0))
    assert (lo, hi) == (data[mask].min(), data[mask].max())
    assert isinstance(lo, float) and isinstance(hi, float)


def test_percentile_normalise_rejects():
    data = np.arange(8.0).reshape(2, 2, 2)
    mask = np.ones((2, 2, 2))  # any non-zero mask counts as brain
    for bad in ((-1.0, 50.0), (50.0, 50.0), (10.0, 100.5)):
        with pytest.raises(ValueError, match="expected 0 <= low < high <= 100"):
            percentile_normalise(data, mask, bad)
    with pytest.raises(ValueError, match=r"^brain mask is empty: no intensities to normalise by$"):
        percentile_normalise(data, np.zeros((2, 2, 2)), (1.0, 99.0))
    with pytest.raises(ValueError, match=r"brain intensities are constant \(3.0\)"):
        percentile_normalise(np.full((2, 2, 2), 3.0), mask, (1.0, 99.0))


def test_box_centre_of_a_non_box_mask_is_its_bounding_box_centre():
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2, 3, 4] = True  # an L-shaped, sparse mask: its mean is nowhere near the box centre
    mask[7, 3, 4] = True
    mask[2, 10, 4] = True
    mask[2, 3, 9] = True
    np.testing.assert_array_equal(brain_box_centre(mask), [4.5, 6.5, 6.5])
    with pytest.raises(ValueError, match=r"^brain mask is empty: it has no bounding box$"):
        brain_box_centre(np.zeros((3, 3, 3)))


@pytest.mark.parametrize(
    ("shape", "centre", "start"),
    [
        ((4, 4, 4), (5.0, 5.0, 5.0), (4, 4, 4)),  # even size: the half-voxel rounds up
        ((3, 3, 3), (5.0, 5.0, 5.0), (4, 4, 4)),  # odd size: centre on the middle voxel
        ((4, 3, 2), (4.5, 2.0, -1.0), (3, 1, -1)),  # half-integer centre, partly outside
        ((4, 4, 4), (7.0, 8.0, 9.0), (6, 7, 8)),  # past the far end: padded there
        ((5, 5, 5), (-4.0, 1.0, 1.0), (-6, -1, -1)),  # entirely outside along axis 0
    ],
)
def test_crop_box_voxels_and_affine(shape, centre, start):
    data = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    affine = np.array([[2.0, 0, 0, -10.0], [0, 1.5, 0, 3.0], [0, 0, 1.0, 7.0], [0, 0, 0, 1.0]])
    box, box_affine = crop_or_pad(data, affine, shape, np.array(centre), fill_value=-1.0)
    assert box.shape == shape and box.dtype == data.dtype
    for idx in np.ndindex(*shape):
        src = np.array(idx) + np.array(start)
        inside = np.all(src >= 0) and np.all(src < data.shape)
        assert box[idx] == (data[tuple(src)] if inside else -1.0), (idx, src)
    # the box's voxel (0,0,0) is the world point of the data's voxel `start`
    np.testing.assert_allclose(box_affine, affine @ _translation(start))
    assert box_affine.dtype == np.float64


def _translation(start):
    t = np.eye(4)
    t[:3, 3] = start
    return t


def test_crop_rejects_bad_shapes():
    data = np.zeros((4, 4, 4))
    for bad in ((4, 4), (4, 0, 4), (4, -1, 4)):
        with pytest.raises(ValueError, match="crop_shape: expected three positive integers"):
            crop_or_pad(data, np.eye(4), bad, np.zeros(3))
