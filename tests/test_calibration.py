"""Calibration protocols on distributions with a known answer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.calibration import (
    calibrate,
    protocol_name,
    threshold_at_healthy_fpr,
    threshold_best_dice,
    threshold_values,
)
from brainuad.evaluation.postprocess import PostprocessConfig


def _subjects(values: np.ndarray, n: int):
    """Split pooled values into n subject volumes with a brain mask that hides a border."""
    maps, masks = [], []
    for chunk in np.array_split(values, n):
        side = math.ceil(math.sqrt(chunk.size)) + 2
        amap = np.full((1, side, side), 1e6, dtype=np.float32)  # outside the brain: huge
        mask = np.zeros_like(amap, dtype=bool)
        flat = mask[0, 1:-1, 1:-1].reshape(-1)
        flat[: chunk.size] = True
        mask[0, 1:-1, 1:-1] = flat.reshape(side - 2, side - 2)
        amap[mask] = chunk
        maps.append(amap)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize(
    ("draw", "fpr", "expected"),
    [("uniform", 0.05, 0.95), ("uniform", 0.01, 0.99), ("normal", 0.05, 1.6449)],
)
def test_healthy_fpr_on_known_distribution(draw, fpr, expected):
    rng = np.random.default_rng(0)
    sample = getattr(rng, draw)(size=100_000).astype(np.float32)
    maps, masks = _subjects(sample, 4)
    threshold, n = threshold_at_healthy_fpr(maps, masks, fpr)
    assert n == sample.size
    assert (sample > threshold).sum() == math.floor(fpr * n)  # no ties: exactly k flagged
    assert threshold == pytest.approx(expected, abs=0.02)
    fresh = getattr(rng, draw)(size=100_000)
    assert (fresh > threshold).mean() == pytest.approx(fpr, abs=0.1 * fpr + 0.002)


def test_healthy_fpr_with_ties_never_flags_more():
    values = np.repeat(np.arange(10, dtype=np.float32), 10)  # 100 voxels, 10 per value
    maps, masks = _subjects(values, 2)
    threshold, _ = threshold_at_healthy_fpr(maps, masks, 0.05)
    assert threshold == 9.0 and (values > threshold).sum() == 0  # 5 of 100 would split a tie
    threshold, _ = threshold_at_healthy_fpr(maps, masks, 0.1)
    assert threshold == 8.0 and (values > threshold).sum() == 10
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_healthy_fpr(maps, masks, 1.5)


def _best_dice_case():
    # positives at 5, 6, 7, 8; negatives at 1, 2, 3, 6.5. Dice of `> t`:
    # t=3 flags 5,6,6.5,7,8 -> 2*4/(5+4) = 8/9, the optimum (t=5: 6/8, t=2: 8/10).
    pos = np.array([5, 6, 7, 8], np.float32)
    neg = np.array([1, 2, 3, 6.5], np.float32)
    maps, segs, masks = [], [], []
    for p, n in ((pos[:2], neg[:3]), (pos[2:], neg[3:])):
        v = np.concatenate([p, n, [99.0]])  # the last voxel lies outside the brain
        maps.append(v.reshape(1, 1, -1))
        segs.append(np.concatenate([np.ones(p.size), np.zeros(n.size), [1]]).reshape(1, 1, -1))
        masks.append((np.arange(v.size) < v.size - 1).reshape(1, 1, -1))
    return maps, segs, masks


def test_best_dice_known_optimum():
    maps, segs, masks = _best_dice_case()
    threshold, best, n = threshold_best_dice(maps, segs, masks)
    assert threshold == 3.0 and best == pytest.approx(8 / 9) and n == 8
    with pytest.raises(InputError, match="no lesion"):
        threshold_best_dice(maps, [np.zeros_like(s) for s in segs], masks)


def test_calibrate_records_protocol_and_data():
    cfg = PostprocessConfig()
    maps, segs, masks = _best_dice_case()
    rec = calibrate(
        "best_dice_val",
        maps=maps,
        brainmasks=masks,
        segs=segs,
        subjects=["s1", "s2"],
        dataset="brats21",
        postprocess=cfg,
        splits=["val"],
        scores_files=["scores/brats21_val.h5"],
    )
    json.dumps(rec)
    assert rec["protocol"] == "best_dice_val" and rec["threshold"] == 3.0
    assert rec["target_fpr"] is None
    assert rec["chosen_on"] == {
        "dataset": "brats21",
        "split": "val",
        "scores_files": ["scores/brats21_val.h5"],
        "subjects": ["s1", "s2"],
        "n_voxels": 8,
        "uses_pixel_labels": True,
        "uses_test_data": False,
    }
    assert rec["postprocess"] == cfg.to_dict() and "git_commit" in rec["provenance"]

    rng = np.random.default_rng(1)
    hmaps, hmasks = _subjects(rng.random(10_000).astype(np.float32), 2)
    healthy = {
        "maps": hmaps,
        "brainmasks": hmasks,
        "subjects": ["a", "b"],
        "dataset": ["ixi", "oasis"],
        "postprocess": cfg,
    }
    rec = calibrate(
        "healthy_fpr",
        **healthy,
        splits=["val", "val"],
        scores_files=["ixi_val.h5", "oasis_val.h5"],
        target_fpr=0.05,
    )
    json.dumps(rec)
    assert rec["target_fpr"] == 0.05 and rec["achieved_fpr_val"] == pytest.approx(0.05)
    assert rec["chosen_on"]["uses_pixel_labels"] is False
    assert rec["chosen_on"]["scores_files"] == ["ixi_val.h5", "oasis_val.h5"]
    assert rec["chosen_on"]["split"] == "val"
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate("healthy_fpr", **healthy, splits=["val"], scores_files=["ixi_val.h5"])
    with pytest.raises(ValueError, match="one split per scores file"):
        calibrate("healthy_fpr", **healthy, splits=["val"], scores_files=[], target_fpr=0.05)


def test_calibrate_records_the_splits_it_was_given():
    """The record states what the caller read, so a test split shows up as test data."""
    rng = np.random.default_rng(2)
    hmaps, hmasks = _subjects(rng.random(1_000).astype(np.float32), 2)
    rec = calibrate(
        "healthy_fpr",
        maps=hmaps,
        brainmasks=hmasks,
        subjects=["a", "b"],
        dataset="ixi",
        postprocess=PostprocessConfig(),
        splits=["val", "test"],
        scores_files=["ixi_val.h5", "ixi_test.h5"],
        target_fpr=0.05,
    )
    assert rec["chosen_on"]["split"] == ["test", "val"]
    assert rec["chosen_on"]["uses_test_data"] is True


def test_protocol_names_and_threshold_values():
    assert protocol_name("healthy_fpr", target_fpr=0.05) == "healthy_fpr_5"
    assert protocol_name("healthy_fpr", target_fpr=0.01) == "healthy_fpr_1"
    assert protocol_name("healthy_fpr", target_fpr=0.005) == "healthy_fpr_0p5"
    assert protocol_name("best_dice_val", dataset="brats21") == "best_dice_val/brats21"
    doc = {"thresholds": {"healthy_fpr_5": {"threshold": 0.3}, "x": 0.1}}
    assert threshold_values(doc) == {"healthy_fpr_5": 0.3, "x": 0.1}
    assert threshold_values({"y": 2}) == {"y": 2.0}
