"""Evaluation modes (brain mask vs the cDDPM reference grid) and the threshold protocols'
settings: best-Dice search (exact vs bisection) and the healthy-FPR denominator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainuad.config import evaluation_grid, main_table_protocols
from brainuad.errors import InputError
from brainuad.evaluation.calibration import (
    calibrate,
    threshold_at_healthy_fpr,
    threshold_at_mean_slice_fpr,
)
from brainuad.evaluation.evaluate import calibrate_from_scores, evaluate_test_split
from brainuad.evaluation.grid import EvaluationConfig, evaluate_volume
from brainuad.evaluation.metrics import (
    best_dice_threshold,
    best_dice_threshold_bisection,
    dice,
    subject_volume_metrics,
)
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.evaluation.volumes import SubjectVolume
from brainuad.io.scores import ScoresWriter
from brainuad.slices.hdf5 import SliceFile, SliceWriter

H = W = 32
REFERENCE = EvaluationConfig(mode="reference", source_spacing_mm=1.0, depth=160)
NO_FILTERS = PostprocessConfig(erode_iterations=0, median_kernel=0, min_component_voxels=0)


def _volume(index: np.ndarray, amap=None, brain=None, seg=None, ignore=None) -> SubjectVolume:
    """A subject whose slices sit at ``index`` (consecutive) of the cropped volume (brain:
    every voxel by default)."""
    n = index.size
    zeros = np.zeros((n, H, W), bool)
    return SubjectVolume(
        subject="s",
        anomaly_map=np.zeros((n, H, W), np.float32) if amap is None else amap,
        brainmask=np.ones((n, H, W), bool) if brain is None else brain,
        seg=zeros.copy() if seg is None else seg,
        slice_index=index,
        rows=np.arange(n),
        present=np.ones(n, bool),
        label=np.zeros(n, np.uint8),
        ignore=ignore,
    )


def test_reference_grid_is_the_central_100_mm_at_2_mm():
    # 1 mm slices 10..149 of a 160-slice crop; the map's value is the slice index.
    index = np.arange(10, 150)
    amap = np.broadcast_to(index[:, None, None], (index.size, H, W)).astype(np.float32)
    seg = np.zeros((index.size, H, W), bool)
    seg[index == 31, 5, 5] = True  # window slice 1: upper slice of reference slice 0
    seg[index == 32, 6, 6] = True  # window slice 2: lower slice of reference slice 1
    brain = np.ones((index.size, H, W), bool)
    out = evaluate_volume(_volume(index, amap, brain, seg), NO_FILTERS, REFERENCE)
    assert REFERENCE.window_start == 30 and out.post_map.shape == (50, H, W)
    # reference slice j covers 1 mm slices 30 + 2j and 31 + 2j: the map is their mean
    np.testing.assert_allclose(out.post_map[:, 0, 0], 30.5 + 2 * np.arange(50))
    # labels take the nearest slice, the tie to the upper one
    assert out.lesion[0, 5, 5] and not out.lesion[1, 6, 6] and out.lesion.sum() == 1
    assert out.region.all() and out.absent_slices == 0  # every voxel is evaluated
    assert REFERENCE.grid_spacing((1.0, 2.0, 2.0)) == (2.0, 2.0, 2.0)
    # an odd margin puts the extra slice before (torchio CropOrPad), a short crop is padded
    assert EvaluationConfig(mode="reference", source_spacing_mm=1.0, depth=161).window_start == 31
    short = EvaluationConfig(mode="reference", source_spacing_mm=1.0, depth=90)
    out = evaluate_volume(_volume(np.arange(90), amap[:90] * 0 + 1), NO_FILTERS, short)
    assert short.window_start == -5 and out.post_map.shape[0] == 50
    # reference slice 2 mixes padding and slice 0 (its brain: slice 0, the upper one);
    # slice 47 mixes slice 89 and padding, and its brain mask is the padding's (empty)
    np.testing.assert_allclose(out.post_map[[0, 2, 3, 46, 47], 0, 0], [0, 0.5, 1, 1, 0])
    assert out.absent_slices == 0  # padding is not the slice file's fault
    # slices missing in the slice file are counted, and out-of-range indices refused
    gap = _volume(np.arange(40, 120))
    gap.present[5] = False
    assert evaluate_volume(gap, NO_FILTERS, REFERENCE).absent_slices == 10 + 10 + 1
    with pytest.raises(InputError, match="outside the cropped volume's 160 slices"):
        evaluate_volume(_volume(np.arange(150, 170)), NO_FILTERS, REFERENCE)
    # at 2 mm already (the default study's slices) the grid is the central 50 slices as is
    same = EvaluationConfig(mode="reference", source_spacing_mm=2.0, depth=80)
    out = evaluate_volume(_volume(np.arange(80), amap[:80]), NO_FILTERS, same)
    np.testing.assert_array_equal(out.post_map[:, 0, 0], amap[15:65, 0, 0])


def test_modes_differ_on_a_lesion_outside_the_eroded_mask():
    index = np.arange(100)
    brain = np.zeros((100, H, W), bool)
    brain[:, 4:28, 4:28] = True
    seg = np.zeros_like(brain)
    seg[40:60, 4, 10:14] = True  # on the brain's edge: outside the eroded mask
    ignore = np.zeros_like(brain)
    ignore[40:60, 27, 20] = True  # WMH's "other pathology" (brain edge): never evaluated
    amap = (seg * 1.0).astype(np.float32)
    vol = _volume(index, amap, brain & ~ignore, seg, ignore)
    cfg = PostprocessConfig(median_kernel=0, min_component_voxels=0)  # erosion W // 25 = 1
    brain_mode = evaluate_volume(vol, cfg, EvaluationConfig())
    reference = evaluate_volume(
        vol, cfg, EvaluationConfig(mode="reference", source_spacing_mm=1.0, depth=100)
    )
    thresholds = {"t": 0.5}
    in_brain = subject_volume_metrics(
        brain_mode.post_map, brain_mode.region, brain_mode.lesion, thresholds, cfg
    )
    whole = subject_volume_metrics(
        reference.post_map, reference.region, reference.lesion, thresholds, cfg
    )
    # brain mask: the lesion is clipped away, the subject counts as lesion-free
    assert in_brain["true_volume_voxels"] == 0 and not in_brain["has_lesion"]
    assert np.isnan(in_brain["dice@t"])
    # the eroded square, less the voxel next to the ignore voxel on 20 slices
    assert in_brain["region_voxels"] == 100 * 22 * 22 - 20
    # reference: the lesion counts (10 slices at 2 mm x 4 voxels) and is missed, since
    # the map is zeroed outside the eroded mask; background counts too
    assert whole["true_volume_voxels"] == 10 * 4 and whole["dice@t"] == 0.0
    assert whole["region_voxels"] == 50 * H * W - 10  # all but the ignore voxels
    assert whole["fpr@t"] == 0.0 and whole["lesion_fn@t"] == 1


def test_bisection_follows_the_reference_steps_and_never_beats_exact():
    values = np.array([0.1, 0.2, 0.9, 0.95])
    labels = np.array([False, False, True, True])
    # by hand: [0, .95] -> Dice(> .2375) = Dice(> .7125) = 1, lower half wins the tie
    assert best_dice_threshold_bisection(values, labels, steps=1) == (1.0, pytest.approx(0.2375))
    # [0, .475] -> Dice(> .11875) = .8 < Dice(> .35625) = 1: upper half, q_high
    assert best_dice_threshold_bisection(values, labels, steps=2) == (
        1.0,
        pytest.approx(0.35625),
    )
    assert best_dice_threshold(values, labels) == (1.0, 0.2)  # exact: a data value
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.random(4000) < 0.05
        values = rng.gamma(2.0, 0.1, 4000) + labels * rng.gamma(2.0, 0.2, 4000)
        exact, _ = best_dice_threshold(values, labels)
        found, t_found = best_dice_threshold_bisection(values, labels)
        assert found == pytest.approx(dice(values > t_found, labels))
        assert found <= exact + 1e-12
        assert found > exact - 0.02  # a unimodal Dice curve: close to the optimum
    # a degenerate range [0, 0] becomes [0, 1] as in the reference; with Dice 0 everywhere
    # ties keep the lower half and the latest point: 1/4 of [0, 2**-9] after 10 steps
    flat = best_dice_threshold_bisection(np.zeros(4), np.array([1, 0, 0, 0], bool))
    assert flat == (0.0, 2.0**-11)


def test_mean_per_slice_fpr_threshold_against_brute_force():
    rng = np.random.default_rng(3)
    maps = [rng.random((4, 6, 6)).round(2), rng.random((3, 6, 6)).round(2)]
    masks = [rng.random((4, 6, 6)) < 0.6, rng.random((3, 6, 6)) < 0.3]
    masks[1][1] = False  # a slice without region voxels is left out of the mean
    slices = [(m[s], b[s]) for m, b in zip(maps, masks, strict=True) for s in range(len(m))]
    slices = [(m[b], b.sum()) for m, b in slices if b.any()]

    def mean_fpr(t):
        return np.mean([(v > t).sum() / n for v, n in slices])

    for fpr in (0.05, 0.2):
        t, n = threshold_at_mean_slice_fpr(maps, masks, fpr)
        candidates = np.unique(np.concatenate([v for v, _ in slices]))
        assert t == min(c for c in candidates if mean_fpr(c) <= fpr)
        assert n == sum(int(b.sum()) for b in masks)
    record = calibrate(
        "healthy_fpr",
        maps=maps,
        brainmasks=masks,
        subjects=["a", "b"],
        dataset="toy",
        postprocess=NO_FILTERS,
        splits=["val"],
        scores_files=["x.h5"],
        target_fpr=0.2,
        fpr_region="image",
        fpr_pooling="per_slice_mean",
    )
    assert record["fpr_denominator"] == {"region": "image", "pooling": "per_slice_mean"}
    assert record["achieved_fpr_val"] == pytest.approx(mean_fpr(record["threshold"]))
    # pooled voxels: unchanged rule (floor(fpr * n) flagged at most)
    t, n = threshold_at_healthy_fpr(maps, masks, 0.2)
    pooled = np.concatenate([m[b] for m, b in zip(maps, masks, strict=True)])
    assert (pooled > t).sum() <= int(0.2 * n) < (pooled >= t).sum()


def _toy_files(tmp_path):
    """Four healthy and four lesion subjects of 8 slices (1 mm) on a 32 x 32 grid, and
    their validation and test scores (the map is the lesion plus noise, in the brain)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.h5"
    with SliceWriter(path, sequences=["t2"], height=H, width=W) as w:
        for i in range(8):
            brain = np.zeros((8, H, W), np.uint8)
            brain[:, 4:28, 4:28] = 1
            seg = np.zeros_like(brain)
            if i >= 4:
                seg[2:6, 10:18, 10:18] = 1
                seg[2:6, 4, 10:14] = 1  # on the brain edge
            images = rng.random((8, 1, H, W)).astype(np.float32) * brain[:, None]
            w.append_subject(f"s{i}", images, brain, seg, np.arange(8))
    sf = SliceFile(path)
    files = {}
    for name, subjects in {
        "healthy": ["s0", "s1"],
        "val": ["s4", "s5"],
        "test": ["s6", "s7"],
    }.items():
        rows = sf.rows_for_subjects(subjects)
        data = sf.read(rows)
        amap = (data["seg"] + 0.3 * rng.random((rows.size, H, W))) * data["brainmask"]
        files[name] = tmp_path / f"{name}.h5"
        attrs = {
            "method": "toy",
            "fold": 0,
            "dataset": "toy",
            "split": "val" if name != "test" else "test",
        }
        with ScoresWriter(
            files[name], rows=rows, height=H, width=W, channels=None, attrs=attrs
        ) as sw:
            sw.write(amap.astype(np.float32))
    return path, files


def test_reference_mode_end_to_end_records_its_settings(tmp_path):
    path, files = _toy_files(tmp_path)
    cfg = PostprocessConfig(median_kernel=3, min_component_voxels=2)
    grid = EvaluationConfig(mode="reference", extent_mm=8, source_spacing_mm=1.0, depth=8)
    record = calibrate_from_scores(
        healthy_val=[(path, files["healthy"])],
        lesion_val={"toy": (path, files["val"])},
        postprocess=cfg,
        fprs=[0.05],
        evaluation=grid,
        best_dice_search="bisection",
        fpr_region="image",
    )
    best = record["thresholds"]["best_dice_val/toy"]
    assert best["search"] == "bisection" and best["bisection_steps"] == 10
    assert best["evaluation"]["mode"] == "reference" and best["chosen_on"]["uses_pixel_labels"]
    assert best["chosen_on"]["n_voxels"] == 2 * 4 * H * W  # whole 4-slice volumes pooled
    healthy = record["thresholds"]["healthy_fpr_5"]
    assert healthy["fpr_denominator"] == {"region": "image", "pooling": "voxels"}
    assert not healthy["chosen_on"]["uses_pixel_labels"]
    table, summary = evaluate_test_split(
        slice_path=path,
        scores_path=files["test"],
        threshold_record=json.loads(json.dumps(record)),
        dataset="toy",
        postprocess=cfg,
        image_score="max",
        spacing=(1.0, 2.0, 2.0),
        healthy_slice_path=path,
        healthy_train_subjects=["s0"],
        evaluation=grid,
    )
    assert summary["evaluation"]["mode"] == "reference"
    assert summary["evaluation"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert summary["slice_level"]["n_slices"] == 2 * 4
    assert (table["region_voxels"] == 4 * H * W).all()
    # the edge lesion (4 voxels per 2 mm slice) counts on the reference grid
    assert (table["true_volume_voxels"] == 2 * (8 * 8 + 4)).all()
    # thresholds from one grid are refused on another
    with pytest.raises(InputError, match="calibrated in evaluation"):
        evaluate_test_split(
            slice_path=path,
            scores_path=files["test"],
            threshold_record=record,
            dataset="toy",
            postprocess=cfg,
            image_score="max",
            spacing=(1.0, 2.0, 2.0),
            healthy_slice_path=path,
            healthy_train_subjects=["s0"],
        )


def test_config_builds_the_grid_and_both_main_protocols():
    config = {
        "preprocess": {"resolution_mm": 1.0, "crop_shape": [160, 192, 160]},
        "evaluation": {"mode": "reference", "default_protocol": "best_dice_val"},
    }
    grid = EvaluationConfig.from_dict(evaluation_grid(config))
    assert (grid.n_window, grid.n_slices, grid.window_start) == (100, 50, 30)
    assert main_table_protocols(config) == ["best_dice_val", "healthy_fpr_5"]
    config["evaluation"] = {"default_protocol": "healthy_fpr_1", "healthy_fprs": [0.01]}
    assert main_table_protocols(config) == ["healthy_fpr_1", "best_dice_val"]
    config["evaluation"]["best_dice_on_validation"] = False
    assert main_table_protocols(config) == ["healthy_fpr_1"]
