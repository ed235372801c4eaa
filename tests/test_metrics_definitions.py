"""Metrics against their definitions (module doc of :mod:`brainuad.evaluation.metrics`):
masks come as the slice files store them (uint8 0/1), not only as bool; HD95's surfaces are
the voxels with a background 6-neighbour, which only solid shapes tell apart from the
26-neighbour erosion; cDDPM's bisection counts ``values > q`` at the quarter points and
starts over ``[0, max]``; per subject, each column is the metric of its definition; and a
metric of nothing is NaN without numpy's empty-mean warnings."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import average_precision_score, roc_auc_score

from brainuad.errors import InputError
from brainuad.evaluation import metrics as M
from brainuad.evaluation.postprocess import PostprocessConfig

NO_CC = PostprocessConfig(min_component_voxels=0)


# --- best Dice: the two searches ------------------------------------------------------------


def test_bisection_counts_values_strictly_above_the_quarter_points():
    # [0, 1]: q_low = .25 lies exactly on a value. Dice(> .25) flags only 1.0: 2 * 1 / (1 + 2);
    # Dice(> .75) is the same, and the tie keeps the lower half with q_low.
    values = np.array([0.0, 0.25, 1.0])
    labels = np.array([False, True, True])
    assert M.best_dice_threshold_bisection(values, labels, steps=1) == (
        pytest.approx(2 / 3),
        0.25,
    )


def test_bisection_reads_labels_as_masks_and_checks_sizes():
    values = np.array([0.1, 0.2, 0.9, 0.95])
    as_seg = np.array([0, 0, 1, 1], dtype=np.uint8)  # a segmentation as stored
    assert M.best_dice_threshold_bisection(values, as_seg) == M.best_dice_threshold_bisection(
        values, as_seg.astype(bool)
    )
    with pytest.raises(ValueError, match="differ in size"):
        M.best_dice_threshold_bisection(values, np.ones(3, bool))
    assert all(math.isnan(x) for x in M.best_dice_threshold_bisection(values, np.zeros(4, bool)))


def test_bisection_on_a_single_lesion_voxel():
    # [0, .5]: Dice(> .125) = Dice(> .375) = 1; the tie keeps q_low, then [0, .25] ...
    best, threshold = M.best_dice_threshold_bisection(np.array([0.5]), np.array([True]), steps=1)
    assert (best, threshold) == (1.0, 0.125)


def test_search_dispatches_to_the_named_search():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.1
    values = rng.random(500) + labels
    assert M.search_best_dice_threshold(values, labels) == M.best_dice_threshold(values, labels)
    assert M.search_best_dice_threshold(
        values, labels, "exact", n_candidates=5
    ) == M.best_dice_threshold(values, labels, n_candidates=5)
    assert M.search_best_dice_threshold(
        values, labels, "bisection"
    ) == M.best_dice_threshold_bisection(values, labels)
    with pytest.raises(ValueError, match=r"best_dice_search.*'golden'"):
        M.search_best_dice_threshold(values, labels, "golden")


def test_quantile_candidates_are_lower_quantiles_of_the_values():
    # 11 values 0..10, 4 candidates: the lower 0, 1/3, 2/3 and 1 quantiles 0, 3, 6 and 10
    # (data values, not the interpolated 3.33 and 6.67), and just below the minimum.
    values = np.arange(11, dtype=np.float64)
    assert M.best_dice_threshold(values, values > 6, n_candidates=4) == (1.0, 6.0)
    # 5 is no candidate: > 6 misses one positive, 2 * 4 / (4 + 5), > 3 flags two negatives,
    # 2 * 5 / (7 + 5)
    assert M.best_dice_threshold(values, values > 5, n_candidates=4) == (
        pytest.approx(8 / 9),
        6.0,
    )
    # one candidate: the minimum itself, or flagging everything
    assert M.best_dice_threshold(values, values > 0, n_candidates=1) == (1.0, 0.0)


def test_exact_search_on_a_single_voxel_and_mismatched_sizes():
    assert M.best_dice_threshold(np.array([0.5]), np.array([True])) == (
        1.0,
        np.nextafter(0.5, -np.inf),
    )
    with pytest.raises(ValueError, match="differ in size"):
        M.best_dice_threshold(np.zeros(4), np.ones(3, bool))


def test_masks_are_read_as_nonzero_is_foreground():
    """A label map (BraTS values 1, 2, 4) or a uint8 mask is a mask: every nonzero voxel."""
    rng = np.random.default_rng(4)
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[1:3, 2:5, 2:5] = 1
    labels[1:3, 5:8, 3:6] = 2
    labels[2, 6, 6:9] = 4
    pred = np.zeros_like(labels)
    pred[1:3, 3:7, 3:7] = 3
    pred[0, 9, 9] = 1
    scores = rng.random(labels.shape) + (labels > 0)
    mask, binary = labels > 0, pred > 0
    assert M.dice(pred, labels) == M.dice(binary, mask)
    assert M.hd95(pred, labels) == M.hd95(binary, mask)
    assert M.lesion_detection(pred, labels) == M.lesion_detection(binary, mask)
    assert M.auroc(scores, labels) == M.auroc(scores, mask)
    assert M.auprc(scores, labels) == M.auprc(scores, mask)
    assert M.best_dice_threshold(scores, labels) == M.best_dice_threshold(scores, mask)
    assert M.best_dice_threshold_bisection(scores, labels) == M.best_dice_threshold_bisection(
        scores, mask
    )


def test_exact_ties_go_to_the_highest_threshold():
    # positives {3, 6} among the values 1..6: > 5 flags {6}, Dice 2 * 1 / (1 + 2) = 2/3;
    # > 2 flags {3, .., 6}, 2 * 2 / (4 + 2) = 2/3 too; every other threshold is lower
    # (> 4: 2/4, > 3: 2/5, > 1: 4/7, below 1: 4/8). The tie goes to the higher, 5.
    values = np.arange(1.0, 7.0)
    labels = np.isin(values, [3, 6])
    assert M.best_dice_threshold(values, labels) == (pytest.approx(2 / 3), 5.0)
    # flagging everything ties with 2: the data value wins over "below the minimum"
    values = np.array([0.0, 1.0, 2.0, 3.0])
    labels = np.array([True, False, False, True])
    assert M.best_dice_threshold(values, labels) == (pytest.approx(2 / 3), 2.0)


# --- HD95 on solid shapes ------------------------------------------------------------------


def _surface_by_definition(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour in the background (outside the array counts)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = [i + 1 for i in idx]
            n[axis] += step
            if not padded[tuple(n)]:
                out[idx] = True
                break
    return out


def _hd95_by_definition(p, g, spacing):
    sp = np.argwhere(_surface_by_definition(p)) * spacing
    sg = np.argwhere(_surface_by_definition(g)) * spacing
    d = cdist(sp, sg)
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def test_hd95_of_solid_shapes_uses_six_neighbour_surfaces():
    z, y, x = np.mgrid[:9, :12, :12]
    ball = (z - 4) ** 2 + (y - 5) ** 2 + (x - 5) ** 2 <= 12
    box = np.zeros_like(ball)
    box[1:8, 4:11, 3:9] = True
    for spacing in ((1.0, 1.0, 1.0), (2.0, 1.0, 0.5)):
        want = _hd95_by_definition(ball, box, np.array(spacing))
        assert M.hd95(ball, box, spacing) == pytest.approx(want)


# --- lesion-wise detection ------------------------------------------------------------------


def test_lesions_are_26_connected_in_the_ground_truth_too():
    gt = np.zeros((3, 6, 6), bool)
    gt[0, 0, 0] = gt[1, 1, 1] = True  # touching by a corner: one lesion
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = True
    out = M.lesion_detection(pred, gt)
    assert (out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]) == (1, 0, 0)


def test_lesion_precision_recall_f1_by_hand():
    gt = np.zeros((1, 12, 12), bool)
    gt[0, 0, 0] = gt[0, 0, 5] = gt[0, 5, 0] = True  # three lesions
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = pred[0, 10, 10] = True  # one hit, one false positive
    out = M.lesion_detection(pred, gt)
    assert (out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]) == (1, 1, 2)
    assert out["lesion_precision"] == 0.5 and out["lesion_recall"] == pytest.approx(1 / 3)
    assert out["lesion_f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))
    gt[0, 5, 0] = False  # one hit, one missed: recall 1/2
    assert M.lesion_detection(pred, gt)["lesion_recall"] == 0.5
    # everything missed and only false positives: precision = recall = 0, F1 0 (not NaN)
    pred[0, 0, 0] = False
    out = M.lesion_detection(pred, gt)
    assert (out["lesion_precision"], out["lesion_recall"], out["lesion_f1"]) == (0.0, 0.0, 0.0)


# --- feature metrics --------------------------------------------------------------------------


def test_feature_metrics_name_themselves():
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert M.fid(x, x, weights_path=None)["skipped"].startswith("FID: no weights path given")
    assert M.lpips(x, x, weights_path=None)["skipped"].startswith("LPIPS: no weights path")
    with pytest.raises(InputError, match=r"fid\.pt2: FID network"):
        M.fid(x, x, weights_path="/nonexistent/fid.pt2")
    with pytest.raises(InputError, match=r"lpips\.pt: LPIPS network"):
        M.lpips(x, x, weights_path="/nonexistent/lpips.pt")


def test_frechet_distance_regularises_a_singular_product_as_pytorch_fid(monkeypatch):
    """When the square root of Σ1Σ2 is not finite, 1e-6 is added to both diagonals."""
    s1 = np.array([[2.0, 0.3], [0.3, 1.0]])
    s2 = np.array([[1.0, -0.2], [-0.2, 0.5]])
    mu1, mu2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    sqrtm = M.linalg.sqrtm
    seen = []

    def first_not_finite(a):
        seen.append(a)
        return np.full_like(a, np.nan) if len(seen) == 1 else sqrtm(a)

    monkeypatch.setattr(M.linalg, "sqrtm", first_not_finite)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    eps = 1e-6 * np.eye(2)
    assert len(seen) == 2 and np.array_equal(seen[1], (s1 + eps) @ (s2 + eps))
    covmean = np.real(sqrtm((s1 + eps) @ (s2 + eps)))
    want = 1.0 + 4.0 + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert got == pytest.approx(want, rel=1e-12)


# --- masks as stored ------------------------------------------------------------------------


def test_false_positive_rate_reads_uint8_masks():
    region = np.zeros((1, 4, 4), np.uint8)
    region[0, :2] = 1  # 8 voxels
    gt = np.zeros_like(region)
    gt[0, 0, 0] = 1
    pred = np.zeros_like(region)
    pred[0, 0, :3] = 3  # 1 lesion voxel, 2 false positives; any nonzero value flags
    assert M.false_positive_rate(pred, gt, region) == pytest.approx(2 / 7)


def test_metrics_of_nothing_are_nan_without_warnings():
    lesion_only = np.ones((1, 2, 2), bool)
    image = np.full((2, 1, 16, 16), 0.5, np.float32)
    no_brain = np.zeros((2, 16, 16), bool)
    scores = np.linspace(0, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for one_class in (np.zeros(4, bool), np.ones(4, bool)):
            assert math.isnan(M.auroc(scores, one_class))
        assert math.isnan(M.auprc(scores, np.zeros(4, bool)))
        assert math.isnan(M.false_positive_rate(lesion_only, lesion_only, lesion_only))
        none = M.reconstruction_quality(image, image, no_brain, np.zeros(2, bool))
        assert all(math.isnan(v) for v in none.values())
        # healthy slices with an empty brain mask: L1 and SSIM, but no in-brain L1
        outside = M.reconstruction_quality(image, image, no_brain, np.ones(2, bool))
        assert outside["recon_l1"] == 0.0 and outside["recon_ssim"] == pytest.approx(1.0)
        assert math.isnan(outside["recon_l1_brain"])


def test_region_errors_read_uint8_masks_and_skip_only_empty_slices():
    rng = np.random.default_rng(1)
    image = rng.random((3, 1, 16, 16))
    reco = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    brain = np.zeros((3, 16, 16), np.uint8)
    brain[1:, 3:13, 3:13] = 1  # slice 0 holds no brain: skipped, slices 1 and 2 count
    lesion = np.zeros_like(brain)
    lesion[2, 6:9, 6:9] = 1
    got = M.region_reconstruction_errors(image, reco, brain, lesion)
    healthy = np.broadcast_to((brain.astype(bool) & ~lesion.astype(bool))[:, None], image.shape)
    anomaly = np.broadcast_to(lesion.astype(bool)[:, None], image.shape)
    d2 = (image - reco) ** 2
    assert got["mse_healthy_region"] == pytest.approx(d2[healthy].mean())
    assert got["mse_anomaly_region"] == pytest.approx(d2[anomaly].mean())


# --- per subject ----------------------------------------------------------------------------


def test_subject_metrics_are_the_definitions_on_uint8_masks():
    rng = np.random.default_rng(2)
    region = np.zeros((6, 16, 16), np.uint8)
    region[:, 2:14, 2:14] = 1
    lesion = np.zeros_like(region)
    lesion[2:5, 5:9, 5:9] = 1
    lesion[3, 5:7, 5:9] = 2  # a label map: every nonzero label is lesion
    lesion[0, 0, 0] = 4  # outside the region: ignored
    post = (rng.random(region.shape) * 0.8 + 0.5 * lesion).astype(np.float32) * region
    spacing = (3.0, 1.0, 0.5)
    row = M.subject_volume_metrics(
        post, region, lesion, {"t": 0.6}, NO_CC, spacing=spacing, voxel_volume_ml=0.002
    )
    r = region.astype(bool)
    gt = lesion.astype(bool) & r
    pred = (post > 0.6) & r
    assert row["region_voxels"] == r.sum() and row["true_volume_voxels"] == gt.sum() == 48
    assert row["auroc"] == pytest.approx(roc_auc_score(gt[r], post[r]))
    assert row["auprc"] == pytest.approx(average_precision_score(gt[r], post[r]))
    assert row["dice@t"] == pytest.approx(M.dice(pred, gt))
    assert row["hd95@t"] == pytest.approx(_hd95_by_definition(pred, gt, np.array(spacing)))
    assert row["fpr@t"] == pytest.approx(pred[~gt & r].mean())
    assert row["pred_volume_voxels@t"] == pred.sum()
    assert row["pred_volume_ml@t"] == pytest.approx(pred.sum() * 0.002)
    # the oracle threshold reproduces the oracle Dice on the region's voxels
    assert M.dice(post[r] > row["oracle_threshold"], gt[r]) == pytest.approx(row["oracle_dice"])
    assert row["oracle_dice"] >= row["dice@t"]


def test_slice_scores_and_detection_read_stored_masks_and_labels():
    rng = np.random.default_rng(3)
    post = rng.random((3, 8, 8)).astype(np.float32)
    region = np.zeros((3, 8, 8), np.uint8)
    region[:, 2:6, 2:6] = 1
    region[1] = 0
    got = M.slice_scores(post, region, "max")
    assert got[0] == post[0, 2:6, 2:6].max() and got[1] == 0.0
    assert got[2] == post[2, 2:6, 2:6].max()
    lesion_voxels = np.array([0, 12, 0, 5])  # a slice is positive when it holds any lesion
    out = M.slice_detection_metrics(np.array([0.1, 0.7, 0.3, 0.4]), lesion_voxels)
    assert out["n_positive_slices"] == 2 and out["slice_auroc"] == 1.0
