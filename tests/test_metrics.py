"""Every metric against an independent computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from brainuad.errors import InputError
from brainuad.evaluation import metrics as M
from brainuad.evaluation.postprocess import PostprocessConfig

NO_CC = PostprocessConfig(min_component_voxels=0)


# --- Dice -------------------------------------------------------------------------------


def test_dice_hand_made():
    p = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    g = np.array([0, 1, 1, 1, 1, 0], dtype=bool)
    assert M.dice(p, g) == pytest.approx(2 * 2 / (3 + 4))


def test_dice_edge_cases():
    empty = np.zeros((3, 4, 4), dtype=bool)
    some = empty.copy()
    some[1, 1, 1] = True
    assert math.isnan(M.dice(empty, empty))  # not 1: nothing to segment
    assert M.dice(some, empty) == 0.0
    assert M.dice(empty, some) == 0.0
    assert M.dice(some, some) == 1.0
    full = np.ones_like(empty)
    assert M.dice(full, full) == 1.0


def test_dice_matches_sklearn_f1():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, g = rng.random((2, 500)) > 0.7
        assert M.dice(p, g) == pytest.approx(f1_score(g, p))


# --- AUROC / AUPRC ------------------------------------------------------------------------


def test_auroc_auprc_match_sklearn_and_nan_cases():
    rng = np.random.default_rng(1)
    s = rng.random(400)
    y = rng.random(400) < s * 0.5
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert M.auprc(s, y) == pytest.approx(average_precision_score(y, s))
    assert math.isnan(M.auroc(s, np.zeros(400, bool)))
    assert math.isnan(M.auroc(s, np.ones(400, bool)))
    assert math.isnan(M.auprc(s, np.zeros(400, bool)))
    assert M.auprc(s, np.ones(400, bool)) == pytest.approx(1.0)


# --- best Dice ----------------------------------------------------------------------------


def _brute_best_dice(v, y):
    best = 0.0
    for t in np.concatenate([np.unique(v), [v.min() - 1]]):
        best = max(best, f1_score(y, v > t, zero_division=0.0))
    return best


def test_best_dice_threshold_exact_against_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(4):
        v = np.round(rng.random(300), 2).astype(np.float32)  # ties on purpose
        y = rng.random(300) < v**2
        best, t = M.best_dice_threshold(v, y)
        assert best == pytest.approx(_brute_best_dice(v, y))
        assert M.dice(v > t, y) == pytest.approx(best)  # the threshold reproduces it
        coarse, t2 = M.best_dice_threshold(v, y, n_candidates=10)
        assert coarse <= best + 1e-12
        assert M.dice(v > t2, y) == pytest.approx(coarse)


def test_best_dice_flag_everything_and_no_positives():
    v = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    best, t = M.best_dice_threshold(v, np.ones(3, bool))
    assert best == 1.0 and (v > t).all()
    assert all(math.isnan(x) for x in M.best_dice_threshold(v, np.zeros(3, bool)))


# --- HD95 -------------------------------------------------------------------------------


def _brute_surface(mask):
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                out[idx] = True
                break
    return out


def _brute_hd95(p, g, spacing):
    sp = np.argwhere(_brute_surface(p)) * spacing
    sg = np.argwhere(_brute_surface(g)) * spacing
    d = cdist(sp, sg)
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 0.5)])
def test_hd95_against_brute_force(spacing):
    rng = np.random.default_rng(3)
    for _ in range(3):
        p = rng.random((6, 10, 10)) > 0.75
        g = rng.random((6, 10, 10)) > 0.8
        assert M.hd95(p, g, spacing) == pytest.approx(_brute_hd95(p, g, np.array(spacing)))


def test_hd95_hand_made_and_empty():
    p = np.zeros((1, 8, 8), bool)
    g = np.zeros((1, 8, 8), bool)
    p[0, 0, 0] = True
    g[0, 3, 4] = True
    assert M.hd95(p, g) == pytest.approx(5.0)  # single-voxel lesions
    assert M.hd95(p, p) == 0.0
    assert math.isnan(M.hd95(p, np.zeros_like(p)))
    assert math.isnan(M.hd95(np.zeros_like(p), g))


# --- lesion-wise ------------------------------------------------------------------------


def test_lesion_detection_hand_made():
    g = np.zeros((5, 20, 20), bool)
    g[1, 1:3, 1:3] = True  # A: hit
    g[1, 10:12, 1:3] = True  # B: hit by the same prediction as C
    g[1, 10:12, 5:7] = True  # C
    g[3, 15:18, 15:18] = True  # D: missed
    p = np.zeros_like(g)
    p[1, 2, 2] = True
    p[1, 11, 2:6] = True  # one component across B and C
    p[4, 5, 5] = True  # FP
    p[3, 1, 10] = True  # FP, touches the next one by a corner only: one component
    p[2, 2, 11] = True
    out = M.lesion_detection(p, g)
    assert (out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]) == (3, 2, 1)
    assert out["lesion_precision"] == pytest.approx(3 / 5)
    assert out["lesion_recall"] == pytest.approx(3 / 4)
    assert out["lesion_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_lesion_detection_empty_cases():
    e = np.zeros((2, 5, 5), bool)
    one = e.copy()
    one[0, 2, 2] = True
    both = M.lesion_detection(e, e)
    assert (both["lesion_tp"], both["lesion_fp"], both["lesion_fn"]) == (0, 0, 0)
    assert math.isnan(both["lesion_precision"]) and math.isnan(both["lesion_recall"])
    missed = M.lesion_detection(e, one)
    assert missed["lesion_fn"] == 1 and missed["lesion_recall"] == 0
    assert math.isnan(missed["lesion_precision"])
    healthy = M.lesion_detection(one, e)
    assert healthy["lesion_fp"] == 1 and healthy["lesion_precision"] == 0
    hit = M.lesion_detection(one, one)
    assert hit["lesion_f1"] == 1.0


def test_false_positive_rate():
    region = np.zeros((1, 4, 4), bool)
    region[0, :2] = True  # 8 voxels
    gt = np.zeros_like(region)
    gt[0, 0, 0] = True
    pred = np.zeros_like(region)
    pred[0, 0, :3] = True  # 1 TP, 2 FP; flagged outside the region is ignored
    pred[0, 3, 3] = True
    assert M.false_positive_rate(pred, gt, region) == pytest.approx(2 / 7)


# --- per subject ------------------------------------------------------------------------


def test_subject_volume_metrics_columns_and_values():
    rng = np.random.default_rng(4)
    region = np.zeros((6, 16, 16), bool)
    region[:, 2:14, 2:14] = True
    lesion = np.zeros_like(region)
    lesion[2:5, 5:9, 5:9] = True
    lesion[0, 0, 0] = True  # outside the region: ignored
    post = (rng.random(region.shape) * 0.5 + lesion).astype(np.float32) * region
    row = M.subject_volume_metrics(
        post, region, lesion, {"a": 0.9, "b": 0.1}, NO_CC, voxel_volume_ml=0.001
    )
    gt = lesion & region
    assert row["has_lesion"] and row["true_volume_voxels"] == 48
    assert row["true_volume_ml"] == pytest.approx(0.048)
    assert row["auroc"] == pytest.approx(roc_auc_score(gt[region], post[region]))
    assert row["auprc"] == pytest.approx(average_precision_score(gt[region], post[region]))
    assert row["dice@a"] == pytest.approx(1.0) and row["oracle_dice"] == pytest.approx(1.0)
    assert row["dice@b"] == pytest.approx(M.dice((post > 0.1) & region, gt))
    assert row["fpr@a"] == 0.0
    for key in ("hd95", "fpr", "pred_volume_voxels", "pred_volume_ml", "lesion_tp", "lesion_f1"):
        assert f"{key}@a" in row and f"{key}@b" in row


def test_subject_volume_metrics_without_lesion():
    """A lesion-free subject has NaN lesion metrics whether or not something is flagged, and
    is described by FPR, false-positive lesions and predicted volume."""
    region = np.zeros((4, 12, 12), bool)
    region[:, 1:11, 1:11] = True
    post = np.zeros(region.shape, np.float32)
    post[1:3, 3:5, 3:5] = 1.0  # one false-positive component of 8 voxels
    lesion = np.zeros_like(region)
    lesion[0, 0, 0] = True  # outside the region: the subject counts as lesion-free
    row = M.subject_volume_metrics(post, region, lesion, {"low": 0.5, "high": 2.0}, NO_CC)
    assert not row["has_lesion"] and row["true_volume_voxels"] == 0
    for name in ("low", "high"):
        for key in M.LESION_CONDITIONAL_METRICS:
            assert math.isnan(row[f"{key}@{name}"]), (key, name)
    assert row["lesion_fp@low"] == 1 and row["pred_volume_voxels@low"] == 8
    assert row["fpr@low"] == pytest.approx(8 / region.sum())
    assert row["lesion_fp@high"] == 0 and row["fpr@high"] == 0.0
    assert row["lesion_tp@low"] == 0 and row["lesion_fn@low"] == 0
    assert math.isnan(row["auprc"]) and math.isnan(row["oracle_dice"])


# --- slice level --------------------------------------------------------------------------


def test_slice_scores_statistics():
    rng = np.random.default_rng(5)
    post = rng.random((3, 8, 8))
    region = np.ones_like(post, dtype=bool)
    region[1] = False
    region[2, :4] = False
    for stat, fn in (("max", np.max), ("mean", np.mean), ("p99", lambda a: np.percentile(a, 99))):
        s = M.slice_scores(post, region, stat)
        assert s[0] == pytest.approx(fn(post[0]))
        assert s[1] == 0.0
        assert s[2] == pytest.approx(fn(post[2, 4:]))
    with pytest.raises(ValueError, match="statistic"):
        M.slice_scores(post, region, "median")


def test_slice_detection_metrics():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1], bool)
    out = M.slice_detection_metrics(s, y)
    assert out["slice_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["slice_auprc"] == pytest.approx(average_precision_score(y, s))
    assert out["n_slices"] == 4 and out["n_positive_slices"] == 2


# --- reconstruction -----------------------------------------------------------------------


def test_reconstruction_quality_and_regions():
    rng = np.random.default_rng(6)
    image = rng.random((3, 2, 16, 16)).astype(np.float32)
    reco = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1).astype(np.float32)
    brain = np.zeros((3, 16, 16), bool)
    brain[:, 2:14, 2:14] = True
    lesion = np.zeros_like(brain)
    lesion[1, 5:9, 5:9] = True
    healthy = np.array([True, False, True])
    q = M.reconstruction_quality(image, reco, brain, healthy)
    x, r = image[[0, 2]].astype(np.float64), reco[[0, 2]].astype(np.float64)
    assert q["recon_l1"] == pytest.approx(np.abs(x - r).mean())
    inside = np.abs(x - r)[np.broadcast_to(brain[[0, 2]][:, None], x.shape)].mean()
    assert q["recon_l1_brain"] == pytest.approx(inside)
    ssim = np.mean(
        [
            structural_similarity(x[s, c], r[s, c], data_range=1.0)
            for s in range(2)
            for c in range(2)
        ]
    )
    assert q["recon_ssim"] == pytest.approx(ssim)
    assert math.isnan(M.reconstruction_quality(image, reco, brain, np.zeros(3, bool))["recon_l1"])

    e = M.region_reconstruction_errors(image, reco, brain, lesion)
    d2 = (image.astype(np.float64) - reco) ** 2
    m = np.broadcast_to(lesion[:, None], image.shape)
    h = np.broadcast_to((brain & ~lesion)[:, None], image.shape)
    assert e["mse_anomaly_region"] == pytest.approx(d2[m].mean())
    assert e["mse_healthy_region"] == pytest.approx(d2[h].mean())
    smap = np.stack(
        [
            np.stack(
                [
                    structural_similarity(
                        image[s, c].astype(np.float64),
                        reco[s, c].astype(np.float64),
                        data_range=1.0,
                        full=True,
                    )[1]
                    for c in range(2)
                ]
            )
            for s in range(3)
        ]
    )
    assert e["ssim_anomaly_region"] == pytest.approx(smap[m].mean())
    assert e["ssim_healthy_region"] == pytest.approx(smap[h].mean())
    none = M.region_reconstruction_errors(image, reco, brain, np.zeros_like(lesion))
    assert math.isnan(none["mse_anomaly_region"]) and math.isnan(none["ssim_anomaly_region"])


# --- feature metrics ----------------------------------------------------------------------


def test_frechet_distance_closed_form():
    # 1D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
    assert M.frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == pytest.approx(4.0 + 1.0)
    cov = np.array([[2.0, 0.3], [0.3, 1.0]])
    assert M.frechet_distance(np.zeros(2), cov, np.zeros(2), cov) == pytest.approx(0.0, abs=1e-8)


def test_feature_metrics_skip_without_weights():
    x = np.zeros((2, 1, 8, 8), np.float32)
    for out in (M.fid(x, x, weights_path=None), M.lpips(x, x, weights_path=None)):
        assert math.isnan(out["value"]) and "no weights" in out["skipped"]
    with pytest.raises(InputError, match="does not exist"):
        M.fid(x, x, weights_path="/nonexistent/fid.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_feature_metrics_with_saved_networks(tmp_path):
    torch = pytest.importorskip("torch")

    class Features(torch.nn.Module):
        """Mean and maximum behind an identity 1x1 convolution: float32 weights, as a real
        feature network's, so the images must reach it as float32."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            torch.nn.init.ones_(self.conv.weight)
            torch.nn.init.zeros_(self.conv.bias)

        def forward(self, x):
            x = self.conv(x)
            return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)

    class Distance(torch.nn.Module):
        """Mean absolute difference behind an identity 1x1 convolution (float32 weights)."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            torch.nn.init.ones_(self.conv.weight)
            torch.nn.init.zeros_(self.conv.bias)

        def forward(self, a, b):
            return (self.conv(a) - self.conv(b)).abs().mean(dim=(1, 2, 3))

    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        Features(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(exported, str(tmp_path / "fid.pt2"))
    torch.jit.script(Distance()).save(str(tmp_path / "lpips.pt"))
    rng = np.random.default_rng(7)
    a = rng.random((20, 1, 8, 8))  # float64 images: cast for the network
    b = rng.random((20, 1, 8, 8)) * 0.5
    fa = np.stack([a.mean((1, 2, 3)), a.max((1, 2, 3))], 1).astype(np.float64)
    fb = np.stack([b.mean((1, 2, 3)), b.max((1, 2, 3))], 1).astype(np.float64)
    want = M.frechet_distance(fa.mean(0), np.cov(fa.T), fb.mean(0), np.cov(fb.T))
    got = M.fid(a, b, weights_path=tmp_path / "fid.pt2")
    assert got["skipped"] is None and got["value"] == pytest.approx(want, rel=1e-4)
    lp = M.lpips(a, b, weights_path=tmp_path / "lpips.pt")
    assert lp == {"value": pytest.approx(np.abs(a - b).mean(), rel=1e-5), "skipped": None}
