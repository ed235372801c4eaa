"""Calibration against its definitions (module doc of :mod:`brainuad.evaluation.calibration`):
a target fraction that the data reach exactly is reached, not missed by a rounding step; the
per-slice mean weighs each slice equally whatever its size; segmentations count every
positive label value as lesion; bad inputs stop with an error that says what is wrong; and
the record holds every setting the threshold was chosen under."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.calibration import (
    BISECTION_STEPS,
    calibrate,
    check_finite_values,
    flagged_fraction,
    protocol_name,
    threshold_at_healthy_fpr,
    threshold_at_mean_slice_fpr,
    threshold_best_dice,
    threshold_entries,
    threshold_values,
)
from brainuad.evaluation.metrics import best_dice_threshold, best_dice_threshold_bisection
from brainuad.evaluation.postprocess import PostprocessConfig

CFG = PostprocessConfig()


def _slice(values) -> tuple[np.ndarray, np.ndarray]:
    """One subject of one slice holding ``values`` in its region and a larger value outside."""
    values = np.asarray(values, dtype=np.float64)
    amap = np.full((1, 1, values.size + 1), 1e6)
    amap[0, 0, : values.size] = values
    mask = np.zeros(amap.shape, bool)
    mask[0, 0, : values.size] = True
    return amap, mask


# --- healthy FPR ----------------------------------------------------------------------------


def test_healthy_fpr_reached_exactly_when_the_data_allow():
    # 10 distinct values, 30 %: k = 3, the 7th smallest (6) flags 7, 8, 9 exactly.
    amap, mask = _slice(np.arange(10))
    assert threshold_at_healthy_fpr([amap], [mask], 0.3) == (6.0, 10)
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.3) == (6.0, 10)
    # fewer than one voxel's worth: nothing flagged, the maximum; 5 % is the default
    assert threshold_at_healthy_fpr([amap], [mask]) == (9.0, 10)
    assert threshold_at_mean_slice_fpr([amap], [mask]) == (9.0, 10)
    # 100 values: the default 5 % flags 5
    amap, mask = _slice(np.arange(100))
    assert threshold_at_healthy_fpr([amap], [mask]) == (94.0, 100)
    assert threshold_at_mean_slice_fpr([amap], [mask]) == (94.0, 100)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1])
def test_fpr_must_be_a_fraction_strictly_between_0_and_1(fpr):
    amap, mask = _slice(np.arange(10))
    for threshold in (threshold_at_healthy_fpr, threshold_at_mean_slice_fpr):
        with pytest.raises(ValueError, match="fpr: expected a fraction"):
            threshold([amap], [mask], fpr)


def test_empty_or_mismatched_regions_are_refused():
    amap, mask = _slice(np.arange(10))
    for threshold in (threshold_at_healthy_fpr, threshold_at_mean_slice_fpr):
        with pytest.raises(InputError, match=r"^healthy FPR calibration: no .*voxels in the"):
            threshold([amap], [np.zeros_like(mask)], 0.05)
        with pytest.raises(InputError, match=r"^healthy FPR calibration: no .*voxels in the"):
            threshold([], [], 0.05)
        with pytest.raises(ValueError, match="2 maps but 1 brain masks"):
            threshold([amap, amap], [mask], 0.05)
        with pytest.raises(ValueError, match=r"maps of shape \(1, 1, 11\) with brain mask"):
            threshold([amap], [mask[..., :5]], 0.05)


def test_non_finite_values_in_the_region_stop_calibration():
    values = np.arange(10, dtype=np.float64)
    values[[2, 5]] = [np.nan, np.inf]
    amap, mask = _slice(values)
    for threshold in (threshold_at_healthy_fpr, threshold_at_mean_slice_fpr):
        with pytest.raises(
            InputError,
            match=r"^healthy FPR calibration: the healthy validation maps: 2 of 10 values are "
            r"NaN or infinite; anomaly maps must be finite \(rescore with a method that "
            r"produces finite maps\)$",
        ):
            threshold([amap], [mask], 0.05)
    amap[0, 0, -1] = np.nan  # outside the region: never seen
    check_finite_values(amap[mask.astype(bool)][:2], "x")
    with pytest.raises(InputError, match=r"^seen: 3 of 11 values"):
        check_finite_values(amap.ravel(), "seen")


def test_mean_slice_fpr_weighs_slices_not_voxels():
    # slice A: 4 voxels 0..3; slice B: 16 voxels 10..25 (one subject, two slices).
    # t = 24 flags 1/16 of B: mean 1/32. t = 23: 2/16 -> 1/16 = 6.25 %; t = 3 flags all of B:
    # mean 50 %; t = 2 flags 1/4 of A too: 62.5 %.
    amap = np.zeros((2, 4, 4))
    mask = np.zeros((2, 4, 4), bool)
    amap[0, 0] = np.arange(4)
    mask[0, 0] = True
    amap[1] = np.arange(10, 26).reshape(4, 4)
    mask[1] = True
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.0625)[0] == 23.0
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.06)[0] == 24.0
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.5)[0] == 3.0
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.625)[0] == 2.0
    # pooled voxels instead: 20 voxels, 6.25 % -> k = 1
    assert threshold_at_healthy_fpr([amap], [mask], 0.0625)[0] == 24.0
    assert flagged_fraction([amap], [mask], 2.0, "per_slice_mean") == pytest.approx(0.625)
    assert flagged_fraction([amap], [mask], 2.0, "voxels") == pytest.approx(17 / 20)
    assert flagged_fraction([amap], [mask], 2.0) == pytest.approx(17 / 20)  # the default
    empty = [np.zeros_like(mask)]
    for pooling in ("voxels", "per_slice_mean"):
        assert math.isnan(flagged_fraction([amap], empty, 2.0, pooling))
        assert math.isnan(flagged_fraction([], [], 2.0, pooling))
        with pytest.raises(ValueError, match="zip"):
            flagged_fraction([amap, amap], [mask], 2.0, pooling)
    # a calibration record follows its pooling: 6.25 % per slice is 23, of voxels 24
    for pooling, threshold, achieved in (("per_slice_mean", 23.0, 0.0625), ("voxels", 24.0, 0.05)):
        rec = calibrate(
            "healthy_fpr",
            maps=[amap],
            brainmasks=[mask],
            subjects=["h"],
            dataset="ixi",
            postprocess=CFG,
            splits=["val"],
            scores_files=["h.h5"],
            target_fpr=0.0625,
            fpr_pooling=pooling,
        )
        assert rec["threshold"] == threshold and rec["achieved_fpr_val"] == achieved
        assert rec["fpr_denominator"] == {"region": "brain", "pooling": pooling}


def test_a_slice_of_one_voxel_is_a_slice():
    # slice A: one voxel (0); slice B: 4 voxels 10..13. Mean per-slice FPR of > 12: 1/8;
    # of > 0: 1/2 (B all flagged, A not); of > -1: 1.
    amap = np.zeros((2, 2, 2))
    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0, 0] = True
    amap[1] = [[10, 11], [12, 13]]
    mask[1] = True
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.125)[0] == 12.0
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.5)[0] == 0.0
    assert flagged_fraction([amap], [mask], 12.0, "per_slice_mean") == 0.125


def test_masks_as_stored_uint8_0_255():
    rng = np.random.default_rng(5)
    maps = [rng.random((3, 6, 6)), rng.random((2, 6, 6))]
    masks = [rng.random((3, 6, 6)) < 0.5, rng.random((2, 6, 6)) < 0.7]
    stored = [m.astype(np.uint8) * 255 for m in masks]
    segs = [rng.random(m.shape) < 0.2 for m in maps]
    for threshold in (threshold_at_healthy_fpr, threshold_at_mean_slice_fpr):
        assert threshold(maps, stored, 0.1) == threshold(maps, masks, 0.1)
    for pooling in ("voxels", "per_slice_mean"):
        assert flagged_fraction(maps, stored, 0.5, pooling) == flagged_fraction(
            maps, masks, 0.5, pooling
        )
    assert threshold_best_dice(maps, segs, stored) == threshold_best_dice(maps, segs, masks)


def test_mean_slice_fpr_ties_never_flag_more():
    # one slice of 10 voxels: 0, 1, then 8 voxels at 5. 10 %: t = 5 flags nothing above it.
    amap, mask = _slice([0, 1, 5, 5, 5, 5, 5, 5, 5, 5])
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.1)[0] == 5.0
    assert threshold_at_mean_slice_fpr([amap], [mask], 0.8)[0] == 1.0


# --- best Dice on validation ----------------------------------------------------------------


def test_best_dice_counts_every_positive_label_value_as_lesion():
    values = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.95])
    seg = np.array([0, 0, 0, 2, 4, 1], np.uint8)  # BraTS-style label values
    amap, mask = _slice(values)
    seg_map = np.zeros(amap.shape, np.uint8)
    seg_map[0, 0, :6] = seg
    threshold, best, n = threshold_best_dice([amap], [seg_map], [mask])
    assert (threshold, best, n) == (0.3, 1.0, 6)
    labels = seg > 0
    for kw, want in (
        ({"n_candidates": 2}, best_dice_threshold(values, labels, n_candidates=2)),
        ({"search": "bisection"}, best_dice_threshold_bisection(values, labels)),
    ):
        threshold, best, _ = threshold_best_dice([amap], [seg_map], [mask], **kw)
        assert (best, threshold) == want
    with pytest.raises(InputError, match=r"^best-Dice calibration: the validation maps: 1 of 6"):
        bad = amap.copy()
        bad[0, 0, 0] = np.nan
        threshold_best_dice([bad], [seg_map], [mask])
    with pytest.raises(
        InputError, match=r"^best-Dice calibration: no lesion voxels inside the brain masks$"
    ):
        threshold_best_dice([amap], [np.zeros_like(seg_map)], [mask])
    with pytest.raises(ValueError, match=r"^2 maps but 1 brain masks$"):
        threshold_best_dice([amap, amap], [seg_map], [mask])
    with pytest.raises(ValueError, match=r"^2 segs but 1 brain masks$"):
        threshold_best_dice([amap], [seg_map, seg_map], [mask])
    with pytest.raises(ValueError, match=r"^segs of shape \(1, 1, 6\) with brain mask"):
        threshold_best_dice([amap], [seg_map[..., :6]], [mask])


@pytest.mark.filterwarnings("ignore:overflow encountered in nextafter:RuntimeWarning")
def test_a_threshold_that_is_not_finite_is_refused():
    # flagging everything is best, and "just below" the smallest float64 is -inf
    low = np.finfo(np.float64).min
    amap, mask = _slice([low, 1.0])
    with pytest.raises(
        InputError, match=r"^best_dice_val calibration on \['v\.h5'\]: threshold -inf"
    ):
        _record(maps=[amap], brainmasks=[mask], segs=[mask])


# --- the record -----------------------------------------------------------------------------


def _record(protocol="best_dice_val", **kw):
    amap, mask = _slice([0.1, 0.2, 0.3, 0.8, 0.9, 0.95])
    seg = (amap > 0.5) & mask
    args = {
        "maps": [amap],
        "brainmasks": [mask],
        "segs": [seg],
        "subjects": ["s1"],
        "dataset": "brats21",
        "postprocess": CFG,
        "splits": ["val"],
        "scores_files": ["v.h5"],
    }
    args.update(kw)
    return calibrate(protocol, **args)


def test_best_dice_record_holds_its_search():
    exact = _record()
    assert exact["threshold"] == 0.3 and exact["pooled_dice_val"] == 1.0
    assert exact["n_candidates"] is None and exact["search"] == "exact"
    assert "bisection_steps" not in exact and "fpr_denominator" not in exact
    assert exact["evaluation"] == {"mode": "brain_mask"}
    # two candidates, the lower 0 and 100 % quantiles 0.1 and 0.95: > 0.1 is the better,
    # 2 * 3 / (5 + 3)
    coarse = _record(n_candidates=2)
    assert coarse["n_candidates"] == 2
    assert coarse["threshold"] == 0.1 and coarse["pooled_dice_val"] == 0.75
    bisection = _record(search="bisection")
    assert bisection["search"] == "bisection" and bisection["bisection_steps"] == BISECTION_STEPS
    assert (
        bisection["threshold"]
        == best_dice_threshold_bisection(
            np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.95]), np.array([0, 0, 0, 1, 1, 1], bool)
        )[1]
    )
    grid = {"mode": "reference", "extent_mm": 100.0}
    assert _record(evaluation=grid)["evaluation"] == grid
    many = _record(dataset=("a", "b"), subjects=("x",), scores_files=("p.h5",))
    assert many["chosen_on"]["dataset"] == ["a", "b"]
    assert many["chosen_on"]["subjects"] == ["x"] and many["chosen_on"]["scores_files"] == ["p.h5"]


def test_healthy_record_holds_its_denominator():
    rec = _record("healthy_fpr", segs=None, target_fpr=0.5, fpr_region="image")
    assert rec["protocol"] == "healthy_fpr" and rec["target_fpr"] == 0.5
    assert rec["threshold"] == 0.3 and rec["achieved_fpr_val"] == 0.5
    assert rec["fpr_denominator"] == {"region": "image", "pooling": "voxels"}
    assert rec["chosen_on"]["uses_pixel_labels"] is False
    assert rec["chosen_on"]["n_voxels"] == 6
    assert "search" not in rec and "pooled_dice_val" not in rec


def test_calibrate_refuses_what_it_cannot_record():
    with pytest.raises(ValueError, match="1 maps but 2 subjects"):
        _record(subjects=["a", "b"])
    with pytest.raises(ValueError, match="2 splits for 1 files"):
        _record(splits=["val", "val"])
    with pytest.raises(ValueError, match=r"^best_dice_val calibration needs segs$"):
        _record(segs=None)
    with pytest.raises(ValueError, match=r"^healthy_fpr calibration needs target_fpr$"):
        _record("healthy_fpr", segs=None)
    with pytest.raises(ValueError, match=r"expected region in .*'skull'"):
        _record("healthy_fpr", target_fpr=0.05, fpr_region="skull")
    with pytest.raises(ValueError, match=r"pooling in .*'median'"):
        _record("healthy_fpr", target_fpr=0.05, fpr_pooling="median")
    with pytest.raises(ValueError, match="protocol: expected healthy_fpr or best_dice_val"):
        _record("oracle")


# --- names and threshold files --------------------------------------------------------------


def test_protocol_name_needs_its_setting():
    with pytest.raises(ValueError, match=r"^healthy_fpr needs target_fpr$"):
        protocol_name("healthy_fpr")
    with pytest.raises(ValueError, match=r"protocol: expected .*'oracle'"):
        protocol_name("oracle")


def test_threshold_values_refuse_what_is_not_a_finite_number():
    assert threshold_entries({"a": 0.1}) == {"a": 0.1}
    assert threshold_entries({"thresholds": {"a": {"threshold": 2}}}) == {"a": {"threshold": 2}}
    for bad in ("high", None, float("nan"), float("inf"), [0.1]):
        with pytest.raises(
            InputError,
            match=r"threshold 'a' is .*expected a finite number; recalibrate \(delete the "
            r"threshold\.json it came from and rerun snakemake\)$",
        ):
            threshold_values({"thresholds": {"a": {"threshold": bad}}})
