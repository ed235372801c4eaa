"""Metrics of anomaly maps, per subject volume: the one place they are defined.

All voxel metrics take the post-processed map and the evaluated region (the eroded brain
mask, see :mod:`brainuad.evaluation.postprocess`); ground truth and predictions outside the
region are ignored. cDDPM computes them over the whole volume instead, background included,
which inflates AUROC and lets lesion voxels outside the eroded mask count as misses.

Conventions (chosen here, stated once):

- Dice = 2|P∩G| / (|P| + |G|). Both empty: NaN (the volume has nothing to segment and is
  left out of means; AnoFPDM's smoothed Dice scores it 1, which rewards nothing). Only one
  empty: 0.
- AUROC: NaN when the region holds one class only. AUPRC
  (``sklearn.metrics.average_precision_score``): NaN when there is no positive voxel.
- ``oracle_dice``: the best Dice of ``map > t`` over every threshold t on that volume alone
  (no component filtering, as cDDPM's ``BestDicePerVol``). It looks at the test labels: an
  upper bound, never a result.
- HD95: symmetric, surface-based. Surfaces are the foreground voxels with a 6-neighbour in the
  background (the array border counts as background). All distances from each surface voxel of
  one mask to the nearest surface voxel of the other, both directions pooled, and the 95th
  percentile (numpy's linear interpolation) of the pooled set (as medpy's ``hd95``). In units
  of ``spacing`` (voxels by default). NaN when either mask is empty.
- Lesion-wise detection: lesions are 26-connected 3D components. A true lesion is detected
  (TP) if any predicted voxel overlaps it, else FN; a predicted component that overlaps no true
  lesion is FP. precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean;
  NaN when the denominator is 0 (F1 is 0 when both are 0).
- FPR: flagged voxels among region voxels without lesion (on a healthy subject, the flagged
  fraction of the brain). Counted after the full binarisation (components removed), so it is
  at most the calibrated target.
- Per subject (:func:`subject_volume_metrics`), the lesion-conditional metrics (Dice, HD95,
  lesion precision, recall and F1) are NaN for a subject without lesion voxels in the region,
  whatever is flagged: otherwise a lesion-free subject scores 0 when anything is flagged and
  NaN when nothing is, so a mean over subjects would count only the lesion-free subjects a
  method flags, a different set per method. Such subjects are described by FPR, false-positive
  lesions and predicted volume instead.
- Slice-level detection: a slice's score is a statistic (``max``, ``mean``, ``p99``) of the
  post-processed map inside the evaluated region of that slice (0 for a slice whose region is
  empty, as cDDPM); the truth is the slice label of the slice file.
- Reconstruction quality (methods with a reconstruction): on slices labelled healthy, mean
  absolute error over the slice and inside the brain mask, and SSIM
  (``skimage.metrics.structural_similarity``, ``data_range=1``, default 7 × 7 window), each
  per slice and channel, then averaged. GenAI_UAD's normative components: MSE and mean SSIM
  (the full SSIM map averaged over the region) between input and reconstruction inside the
  healthy brain (brain mask minus lesion) and inside the lesion, separately, over all slices.
- Feature metrics (FID, LPIPS) need network weights; given no weights path they return NaN
  with a ``skipped`` note. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import linalg, ndimage
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score

from brainuad.errors import InputError
from brainuad.evaluation.postprocess import CONNECTIVITY_26, PostprocessConfig, binarise

ImageScore = Literal["max", "mean", "p99"]
_NAN = float("nan")

LESION_CONDITIONAL_METRICS = ("dice", "hd95", "lesion_precision", "lesion_recall", "lesion_f1")
"""Per-protocol metrics defined only for a subject with lesion voxels (NaN otherwise)."""


# --- voxel-wise ------------------------------------------------------------------------


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary arrays; NaN when both are empty."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return _NAN
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(labels, dtype=bool).ravel()
    if y.all() or not y.any():
        return _NAN
    return float(roc_auc_score(y, np.asarray(scores).ravel()))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve); NaN without positives."""
    y = np.asarray(labels, dtype=bool).ravel()
    if not y.any():
        return _NAN
    return float(average_precision_score(y, np.asarray(scores).ravel()))


def best_dice_threshold(
    values: np.ndarray, labels: np.ndarray, n_candidates: int | None = None
) -> tuple[float, float]:
    """The threshold t maximising Dice of ``values > t`` against ``labels``.

    Args:
        values: scores, any shape (flattened).
        labels: bool of the same size.
        n_candidates: None searches every distinct value exactly; an int searches only that
            many candidates at evenly spaced quantiles of ``values``.

    Returns:
        ``(best_dice, threshold)``. Thresholds are values of ``values`` (or just below the
        minimum, to flag everything), so ``values > threshold`` reproduces the optimum
        exactly. Ties go to the highest threshold. ``(NaN, NaN)`` without positive labels.
    """
    v = np.asarray(values).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if v.shape != y.shape:
        raise ValueError(f"values {v.shape} and labels {y.shape} differ in size")
    n_pos = int(y.sum())
    if n_pos == 0 or v.size == 0:
        return _NAN, _NAN
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # cum_pos[i]: positives among the i smallest values.
    cum_pos = np.concatenate([[0], np.cumsum(y[order], dtype=np.int64)])
    if n_candidates is None:
        candidates = np.unique(sorted_v)
    else:
        q = np.linspace(0.0, 1.0, max(int(n_candidates), 1))
        candidates = np.unique(np.quantile(sorted_v, q, method="lower"))
    below_min = np.nextafter(sorted_v[0], np.asarray(-np.inf, dtype=sorted_v.dtype))
    candidates = np.concatenate([candidates[::-1], [below_min]])  # high to low
    n_not_above = np.searchsorted(sorted_v, candidates, side="right")
    flagged = v.size - n_not_above
    tp = n_pos - cum_pos[n_not_above]
    scores = 2.0 * tp / (flagged + n_pos)
    best = int(np.argmax(scores))
    return float(scores[best]), float(candidates[best])


BestDiceSearch = Literal["exact", "bisection"]
BISECTION_STEPS = 10
"""Steps of cDDPM's threshold bisection (``find_best_val(..., max_steps=10)``)."""


def best_dice_threshold_bisection(
    values: np.ndarray, labels: np.ndarray, steps: int = BISECTION_STEPS
) -> tuple[float, float]:
    """cDDPM's best-Dice threshold search: an iterative interval bisection over ``[0, max]``.

    The search of the reference (``find_best_val`` in cDDPM's ``src/utils/utils_eval.py``,
    after D. Zimmerer): on the interval ``[lo, hi]`` (first ``[0, max(values)]``; an empty
    interval ``lo == hi`` becomes ``[lo, 1]``) Dice of ``values > q`` is computed at the
    quarter points ``q_low = lo + (hi - lo) / 4`` and ``q_high = lo + 3 (hi - lo) / 4``. If
    ``Dice(q_low) >= Dice(q_high)`` the search continues on the lower half ``[lo, centre]``
    and ``q_low`` becomes the best point when its Dice is ``>=`` the best so far (which
    starts at Dice 0, threshold 0); otherwise on the upper half with ``q_high``. After
    ``steps`` steps the best point is returned. It evaluates 2 · ``steps`` thresholds and can
    miss the global optimum of a multimodal Dice curve; :func:`best_dice_threshold` is exact.

    Returns:
        ``(best_dice, threshold)``; ``(NaN, NaN)`` without positive labels.
    """
    v = np.asarray(values).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if v.shape != y.shape:
        raise ValueError(f"values {v.shape} and labels {y.shape} differ in size")
    n_pos = int(y.sum())
    if n_pos == 0 or v.size == 0:
        return _NAN, _NAN
    positives = v[y]

    def dice_at(threshold: float) -> float:
        flagged = int((v > threshold).sum())
        return 2.0 * int((positives > threshold).sum()) / (flagged + n_pos)

    lo, hi = 0.0, float(v.max())
    best, best_threshold = 0.0, 0.0
    for _ in range(int(steps)):
        if lo == hi:
            hi = 1.0
        q_low, q_high, centre = lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo), lo + 0.5 * (hi - lo)
        d_low, d_high = dice_at(q_low), dice_at(q_high)
        if d_low >= d_high:
            if d_low >= best:
                best, best_threshold = d_low, q_low
            hi = centre
        else:
            if d_high >= best:
                best, best_threshold = d_high, q_high
            lo = centre
    return float(best), float(best_threshold)


def search_best_dice_threshold(
    values: np.ndarray,
    labels: np.ndarray,
    search: BestDiceSearch = "exact",
    n_candidates: int | None = None,
) -> tuple[float, float]:
    """:func:`best_dice_threshold` (``exact``) or :func:`best_dice_threshold_bisection`."""
    if search == "exact":
        return best_dice_threshold(values, labels, n_candidates=n_candidates)
    if search == "bisection":
        return best_dice_threshold_bisection(values, labels)
    raise ValueError(f"best_dice_search: expected 'exact' or 'bisection', got {search!r}")


# --- distances and lesions -------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return mask & ~inner


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces (see module doc)."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if not p.any() or not g.any():
        return _NAN
    sp = p.ndim * (1.0,) if spacing is None else tuple(float(s) for s in spacing)
    sp_, sg = _surface(p), _surface(g)
    # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel.
    to_g = ndimage.distance_transform_edt(~sg, sampling=sp)
    to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    distances = np.concatenate([to_g[sp_], to_p[sg]])
    return float(np.percentile(distances, 95))


def lesion_detection(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Lesion-wise TP, FP, FN, precision, recall and F1 (26-connected 3D components)."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    gt_labels, n_gt = ndimage.label(g, structure=CONNECTIVITY_26)
    pred_labels, n_pred = ndimage.label(p, structure=CONNECTIVITY_26)
    tp = np.unique(gt_labels[p & g]).size
    fp = n_pred - np.unique(pred_labels[p & g]).size
    fn = n_gt - tp
    precision = tp / (tp + fp) if tp + fp else _NAN
    recall = tp / (tp + fn) if tp + fn else _NAN
    if np.isnan(precision) or np.isnan(recall):
        f1 = _NAN
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "lesion_tp": int(tp),
        "lesion_fp": int(fp),
        "lesion_fn": int(fn),
        "lesion_precision": float(precision),
        "lesion_recall": float(recall),
        "lesion_f1": float(f1),
    }


def false_positive_rate(pred: np.ndarray, gt: np.ndarray, region: np.ndarray) -> float:
    """Flagged fraction of the region's voxels that are not lesion; NaN if there are none."""
    negatives = np.asarray(region, dtype=bool) & ~np.asarray(gt, dtype=bool)
    n = int(negatives.sum())
    return float(np.asarray(pred, dtype=bool)[negatives].sum() / n) if n else _NAN


# --- per subject -----------------------------------------------------------------------


def subject_volume_metrics(
    post_map: np.ndarray,
    region: np.ndarray,
    lesion: np.ndarray,
    thresholds: Mapping[str, float],
    cfg: PostprocessConfig,
    *,
    spacing: tuple[float, ...] | None = None,
    voxel_volume_ml: float | None = None,
) -> dict[str, Any]:
    """Every voxel metric of one subject, as a flat dict of columns.

    Args:
        post_map: post-processed map ``[S, H, W]`` (:func:`postprocess_map`).
        region: evaluated region (eroded brain mask), bool ``[S, H, W]``.
        lesion: ground truth, bool ``[S, H, W]`` (restricted to ``region`` here).
        thresholds: protocol name -> threshold; one set of ``...@<protocol>`` columns each.
        cfg: post-processing (for component removal after thresholding).
        spacing: voxel size per axis for HD95 (default: voxel units).
        voxel_volume_ml: volume of one voxel in ml; volumes in ml are NaN without it.

    Returns:
        Columns ``has_lesion, region_voxels, true_volume_voxels, true_volume_ml, auroc,
        auprc, oracle_dice, oracle_threshold`` and, per protocol p, ``dice@p, hd95@p,
        fpr@p, pred_volume_voxels@p, pred_volume_ml@p, lesion_tp@p, lesion_fp@p,
        lesion_fn@p, lesion_precision@p, lesion_recall@p, lesion_f1@p``. Without lesion
        voxels in the region, the :data:`LESION_CONDITIONAL_METRICS` columns and the
        threshold-free ``auroc, auprc, oracle_dice`` are NaN.
    """
    region = np.asarray(region, dtype=bool)
    gt = np.asarray(lesion, dtype=bool) & region
    values = np.asarray(post_map)[region]
    labels = gt[region]
    ml = _NAN if voxel_volume_ml is None else float(voxel_volume_ml)
    true_voxels = int(labels.sum())
    oracle, oracle_t = best_dice_threshold(values, labels)
    row: dict[str, Any] = {
        "has_lesion": bool(true_voxels),
        "region_voxels": int(values.size),
        "true_volume_voxels": true_voxels,
        "true_volume_ml": true_voxels * ml,
        "auroc": auroc(values, labels),
        "auprc": auprc(values, labels),
        "oracle_dice": oracle,
        "oracle_threshold": oracle_t,
    }
    for name, threshold in thresholds.items():
        pred = binarise(post_map, threshold, cfg) & region
        pred_voxels = int(pred.sum())
        row[f"dice@{name}"] = dice(pred, gt)
        row[f"hd95@{name}"] = hd95(pred, gt, spacing)
        row[f"fpr@{name}"] = false_positive_rate(pred, gt, region)
        row[f"pred_volume_voxels@{name}"] = pred_voxels
        row[f"pred_volume_ml@{name}"] = pred_voxels * ml
        for key, value in lesion_detection(pred, gt).items():
            row[f"{key}@{name}"] = value
        if not true_voxels:  # module doc: undefined without a lesion, not 0
            for key in LESION_CONDITIONAL_METRICS:
                row[f"{key}@{name}"] = _NAN
    return row


# --- slice-level detection ---------------------------------------------------------------


def slice_scores(post_map: np.ndarray, region: np.ndarray, statistic: ImageScore) -> np.ndarray:
    """One anomaly score per slice: ``statistic`` of the map inside the slice's region.

    Slices with an empty region score 0.
    """
    post_map = np.asarray(post_map)
    region = np.asarray(region, dtype=bool)
    out = np.zeros(post_map.shape[0], dtype=np.float64)
    for i in range(post_map.shape[0]):
        inside = post_map[i][region[i]]
        if inside.size == 0:
            continue
        if statistic == "max":
            out[i] = inside.max()
        elif statistic == "mean":
            out[i] = inside.mean()
        elif statistic == "p99":
            out[i] = np.percentile(inside, 99)
        else:
            raise ValueError(f"image score statistic: expected max, mean or p99, got {statistic!r}")
    return out


def slice_detection_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC of slice scores against slice labels, with the counts."""
    y = np.asarray(labels, dtype=bool)
    return {
        "slice_auroc": auroc(scores, y),
        "slice_auprc": auprc(scores, y),
        "n_slices": int(y.size),
        "n_positive_slices": int(y.sum()),
    }


# --- reconstruction ----------------------------------------------------------------------


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, full = structural_similarity(a, b, data_range=1.0, full=True)
    return full


def reconstruction_quality(
    image: np.ndarray, reconstruction: np.ndarray, brainmask: np.ndarray, healthy: np.ndarray
) -> dict[str, float]:
    """L1, in-brain L1 and SSIM on healthy slices.

    Args:
        image, reconstruction: ``[S, C, H, W]`` in [0, 1].
        brainmask: bool ``[S, H, W]``.
        healthy: bool ``[S]``, the slices to use (present and without lesion).

    Returns:
        ``recon_l1, recon_l1_brain, recon_ssim`` (NaN without healthy slices).
    """
    l1, l1_brain, ssim = [], [], []
    for s in np.flatnonzero(healthy):
        for c in range(image.shape[1]):
            x, r = image[s, c].astype(np.float64), reconstruction[s, c].astype(np.float64)
            err = np.abs(x - r)
            l1.append(err.mean())
            if brainmask[s].any():
                l1_brain.append(err[brainmask[s]].mean())
            ssim.append(structural_similarity(x, r, data_range=1.0))
    return {
        "recon_l1": float(np.mean(l1)) if l1 else _NAN,
        "recon_l1_brain": float(np.mean(l1_brain)) if l1_brain else _NAN,
        "recon_ssim": float(np.mean(ssim)) if ssim else _NAN,
    }


def region_reconstruction_errors(
    image: np.ndarray, reconstruction: np.ndarray, brainmask: np.ndarray, lesion: np.ndarray
) -> dict[str, float]:
    """GenAI_UAD components: MSE and SSIM inside the healthy brain and inside the lesion.

    Args:
        image, reconstruction: ``[S, C, H, W]`` in [0, 1].
        brainmask, lesion: bool ``[S, H, W]``.

    Returns:
        ``mse_healthy_region, mse_anomaly_region, ssim_healthy_region,
        ssim_anomaly_region`` (NaN for an empty region).
    """
    brain = np.asarray(brainmask, dtype=bool)
    les = np.asarray(lesion, dtype=bool)
    regions = {"healthy_region": brain & ~les, "anomaly_region": les}
    sq = {k: 0.0 for k in regions}
    ss = {k: 0.0 for k in regions}
    count = {k: 0 for k in regions}
    for s in range(image.shape[0]):
        if not (brain[s].any() or les[s].any()):
            continue
        for c in range(image.shape[1]):
            x, r = image[s, c].astype(np.float64), reconstruction[s, c].astype(np.float64)
            smap = _ssim_map(x, r)
            for key, reg in regions.items():
                m = reg[s]
                if m.any():
                    sq[key] += float(((x[m] - r[m]) ** 2).sum())
                    ss[key] += float(smap[m].sum())
                    count[key] += int(m.sum())
    out: dict[str, float] = {}
    for key in regions:
        n = count[key]
        out[f"mse_{key}"] = sq[key] / n if n else _NAN
        out[f"ssim_{key}"] = ss[key] / n if n else _NAN
    return out


# --- feature-based (need weights) --------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between two Gaussians: |μ1-μ2|² + tr(Σ1 + Σ2 - 2(Σ1Σ2)^½)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise as in pytorch-fid
        eps = 1e-6 * np.eye(s1.shape[0])
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _skipped(name: str) -> dict[str, Any]:
    return {
        "value": _NAN,
        "skipped": f"{name}: no weights path given; feature metrics never download weights",
    }


def _load_module(weights_path: str | os.PathLike, name: str):
    """A network from ``weights_path``: ``.pt2`` is a ``torch.export`` program, anything else
    a TorchScript module. Both are self-contained, so no code or download is needed."""
    path = Path(weights_path)
    if not path.exists():
        raise InputError(
            f"{path}: {name} network (torch.export .pt2 or TorchScript) does not exist"
        )
    import torch

    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module(), torch
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module, torch


def fid(
    images_a: np.ndarray,
    images_b: np.ndarray,
    *,
    weights_path: str | os.PathLike | None,
) -> dict[str, Any]:
    """FID between two image sets ``[N, C, H, W]`` with a given feature extractor.

    ``weights_path`` names a network (``.pt2`` exported program or TorchScript) mapping
    ``[B, C, H, W]`` to features ``[B, D]``. Without it: ``{"value": NaN, "skipped": ...}``.
    """
    if weights_path is None:
        return _skipped("FID")
    module, torch = _load_module(weights_path, "FID")
    with torch.no_grad():
        fa = module(torch.as_tensor(images_a, dtype=torch.float32)).double().numpy()
        fb = module(torch.as_tensor(images_b, dtype=torch.float32)).double().numpy()
    value = frechet_distance(
        fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)
    )
    return {"value": value, "skipped": None}


def lpips(
    image: np.ndarray, reconstruction: np.ndarray, *, weights_path: str | os.PathLike | None
) -> dict[str, Any]:
    """Mean LPIPS over pairs ``[N, C, H, W]`` with a given LPIPS network.

    ``weights_path`` names a network (``.pt2`` exported program or TorchScript) mapping two
    ``[B, C, H, W]`` batches to per-pair distances. Without it: ``{"value": NaN, "skipped": ...}``.
    """
    if weights_path is None:
        return _skipped("LPIPS")
    module, torch = _load_module(weights_path, "LPIPS")
    with torch.no_grad():
        d = module(
            torch.as_tensor(image, dtype=torch.float32),
            torch.as_tensor(reconstruction, dtype=torch.float32),
        )
    return {"value": float(d.double().mean()), "skipped": None}
