"""Per-dataset options outside the adapters: the WMH ignore mask reaching evaluation, the
identity registration for data in template space, and HD-BET's errors."""

from __future__ import annotations

from pathlib import Path

import ants
import numpy as np
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.volumes import iter_subject_volumes
from brainuad.io.scores import ScoresWriter
from brainuad.preprocess.register import identity
from brainuad.preprocess.skullstrip_hdbet import check_hdbet
from brainuad.slices.hdf5 import SliceWriter


def test_ignored_voxels_are_not_scored(tmp_path: Path) -> None:
    n, size = 3, 8
    brainmask = np.ones((n, size, size), np.uint8)
    seg = np.zeros((n, size, size), np.uint8)
    seg[1, 2:4, 2:4] = 1
    ignore = np.zeros((n, size, size), np.uint8)
    ignore[1, 5:7, 5:7] = 1
    slices = tmp_path / "wmh.h5"
    with SliceWriter(slices, sequences=["t1"], height=size, width=size, with_ignore=True) as w:
        w.append_subject(
            "sub-1", np.zeros((n, 1, size, size)), brainmask, seg, np.arange(n), ignore=ignore
        )
    scores = tmp_path / "scores.h5"
    with ScoresWriter(
        scores, rows=np.arange(n), height=size, width=size, channels=None, attrs={}
    ) as s:
        s.write(np.ones((n, size, size), np.float32))
    (volume,) = iter_subject_volumes(slices, scores)
    assert volume.brainmask.sum() == brainmask.sum() - 4
    assert not (volume.brainmask & (ignore > 0)).any()
    assert volume.seg.sum() == 4  # the lesion itself is still scored


def test_writer_refuses_a_missing_or_unexpected_ignore_mask(tmp_path: Path) -> None:
    args = (np.zeros((1, 1, 4, 4)), np.ones((1, 4, 4)), np.zeros((1, 4, 4)), np.arange(1))
    plain = SliceWriter(tmp_path / "a.h5", sequences=["t1"], height=4, width=4)
    with plain as w, pytest.raises(ValueError, match="ignore mask"):
        w.append_subject("sub-1", *args, ignore=np.zeros((1, 4, 4)))
    ignoring = SliceWriter(tmp_path / "b.h5", sequences=["t1"], height=4, width=4, with_ignore=True)
    with ignoring as w, pytest.raises(ValueError, match="ignore mask"):
        w.append_subject("sub-1", *args)


def test_identity_registration_only_resamples() -> None:
    rng = np.random.default_rng(0)
    image = ants.from_numpy(rng.random((10, 12, 8)).astype(np.float32), spacing=(2.0, 2.0, 2.0))
    coarse = ants.resample_image(image, (4.0, 4.0, 4.0), use_voxels=False, interp_type=1)
    with identity(image, image) as reg:
        same = reg.to_fixed(image, "nearestNeighbor")
        onto_coarse = reg.to_fixed(image, "nearestNeighbor", coarse)
    np.testing.assert_array_equal(same.numpy(), image.numpy())
    assert onto_coarse.shape == coarse.shape


def test_hdbet_needs_its_weights_and_package(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"preprocess\.hdbet_weights: .* none given"):
        check_hdbet(None)
    with pytest.raises(InputError, match="not a folder of HD-BET model files"):
        check_hdbet(str(tmp_path / "missing"))
    (tmp_path / "0.model").write_bytes(b"x")
    with pytest.raises(InputError, match="hd-bet package"):
        check_hdbet(str(tmp_path))
