"""Threshold calibration protocols, each recorded together with the data it saw.

Two protocols (see REFERENCES.md, "Evaluation protocols in the references"):

``healthy_fpr``
    The threshold that flags a target fraction (5 %, 1 %) of healthy validation brain voxels,
    pooled over subjects (autoDDPM / GenAI_UAD; cDDPM logs it). Uses no pixel labels: only
    the knowledge that the validation subjects are healthy. Named ``healthy_fpr_<percent>``.
``best_dice_val``
    cDDPM's protocol: the threshold maximising Dice on the pooled voxels of a lesion cohort's
    validation split. It sees pixel labels (``uses_pixel_labels: true``), so it is a
    different claim than healthy calibration. Named ``best_dice_val/<dataset>``.

Both work on post-processed maps on the evaluation grid (:mod:`brainuad.evaluation.grid`)
and on ``map > threshold`` before component removal (as cDDPM's ``find_best_val`` and its
healthy thresholds). ``best_dice_val`` pools the evaluated voxels (the eroded brain mask in
``brain_mask`` mode, every voxel in ``reference`` mode, as cDDPM pools whole volumes); its
search is exact over every distinct value (``search: exact``) or cDDPM's 10-step bisection
over ``[0, max]`` (``search: bisection``,
:func:`brainuad.evaluation.metrics.best_dice_threshold_bisection`).

The healthy-FPR denominator is a setting, recorded with each threshold:

- ``fpr_region``: ``brain`` (the eroded brain mask) or ``image`` (every voxel of the
  evaluation grid; cDDPM's logged thresholds and GenAI_UAD count the whole image);
- ``fpr_pooling``: ``voxels`` (the flagged fraction of all pooled voxels) or
  ``per_slice_mean`` (the mean over axial slices of each slice's flagged fraction, as
  GenAI_UAD's mean per-image FPR; slices with no voxel of the region are left out).

Quantile convention for ``healthy_fpr``: with n pooled healthy voxel values and
k = floor(fpr · n), the threshold is the (n - k)-th smallest value, i.e. the smallest
healthy value t with #{v > t} ≤ k. Without ties exactly k voxels are flagged; ties at the
threshold flag fewer, never more. With ``per_slice_mean`` each voxel weighs
1 / (number of slices · voxels of its slice) and the threshold is the smallest healthy value
t whose flagged weight (the mean per-slice FPR of ``map > t``) is at most the target
(GenAI_UAD takes the largest mean FPR ≤ 5 % over 1000 thresholds in [0, 1); here every
distinct value is a candidate). (cDDPM's ``roc_curve`` choice is the first threshold whose
FPR exceeds the target, i.e. slightly more than the target.)

Nothing here reads files: the functions see only the arrays they are given, and record the
scores files and splits the caller says they came from. The orchestration in
:mod:`brainuad.evaluation.evaluate` reads each file's ``split`` attribute and refuses any
file that is not a validation split.

A ``threshold.json`` holds several protocols::

    {"thresholds": {"healthy_fpr_5": {...}, "healthy_fpr_1": {...},
                    "best_dice_val/brats21": {...}}, "provenance": {...}}

each entry as returned by :func:`calibrate`; :func:`threshold_entries` reads either form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from brainuad.config import healthy_fpr_protocol
from brainuad.errors import InputError
from brainuad.evaluation.metrics import (
    BISECTION_STEPS,
    BestDiceSearch,
    search_best_dice_threshold,
)
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.provenance import provenance

Protocol = Literal["healthy_fpr", "best_dice_val"]
FprRegion = Literal["brain", "image"]
FprPooling = Literal["voxels", "per_slice_mean"]
FPR_REGIONS = ("brain", "image")
FPR_POOLINGS = ("voxels", "per_slice_mean")

#: What a threshold file is, in error messages.
THRESHOLD_FILE = "threshold file (threshold.json, brainuad.evaluation.calibration)"


def check_finite_values(values: np.ndarray, what: str) -> None:
    """Raise InputError naming ``what`` if ``values`` hold NaN or infinite entries.

    A NaN anomaly value compares False with every threshold, so it would silently be
    "not flagged" and a NaN threshold would flag nothing; both must stop the run instead.
    """
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(
            f"{what}: {int(bad.sum())} of {values.size} values are NaN or infinite; "
            "anomaly maps must be finite (rescore with a method that produces finite maps)"
        )


def _pool(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray], what: str) -> np.ndarray:
    if len(arrays) != len(masks):
        raise ValueError(f"{len(arrays)} {what} but {len(masks)} brain masks")
    parts = []
    for a, m in zip(arrays, masks, strict=True):
        a = np.asarray(a)
        m = np.asarray(m, dtype=bool)
        if a.shape != m.shape:
            raise ValueError(f"{what} of shape {a.shape} with brain mask {m.shape}")
        parts.append(a[m])
    return np.concatenate(parts) if parts else np.empty(0)


def protocol_name(protocol: Protocol, *, target_fpr: float | None = None, dataset: str = "") -> str:
    """The key of a protocol in ``threshold.json`` and in metric columns.

    ``healthy_fpr`` at 0.05 -> ``healthy_fpr_5`` (0.005 -> ``healthy_fpr_0p5``, one rule with
    :func:`brainuad.config.healthy_fpr_protocol`); ``best_dice_val`` on brats21 ->
    ``best_dice_val/brats21``.
    """
    if protocol == "healthy_fpr":
        if target_fpr is None:
            raise ValueError("healthy_fpr needs target_fpr")
        return healthy_fpr_protocol(target_fpr)
    if protocol == "best_dice_val":
        return f"best_dice_val/{dataset}"
    raise ValueError(f"protocol: expected healthy_fpr or best_dice_val, got {protocol!r}")


def threshold_at_healthy_fpr(
    healthy_maps: Sequence[np.ndarray], brainmasks: Sequence[np.ndarray], fpr: float = 0.05
) -> tuple[float, int]:
    """The threshold flagging at most ``fpr`` of pooled healthy brain voxels.

    Args:
        healthy_maps: post-processed maps of healthy validation subjects.
        brainmasks: the evaluated regions (eroded brain masks), same shapes.
        fpr: target fraction in (0, 1).

    Returns:
        ``(threshold, n_voxels)``; ``map > threshold`` flags ``floor(fpr · n)`` voxels when
        there are no ties (module doc).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr: expected a fraction in (0, 1), got {fpr}")
    values = _pool(healthy_maps, brainmasks, "maps")
    n = values.size
    if n == 0:
        raise InputError("healthy FPR calibration: no brain voxels in the healthy maps")
    check_finite_values(values, "healthy FPR calibration: the healthy validation maps")
    k = math.floor(fpr * n)
    rank = n - k - 1
    return float(np.partition(values, rank)[rank]), int(n)


def _slice_weights(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per pooled voxel, 1 / (slices with voxels · voxels of its slice): the weights whose sum
    over flagged voxels is the mean per-slice flagged fraction."""
    counts = [np.asarray(m, bool).reshape(np.shape(m)[0], -1).sum(axis=1) for m in masks]
    n_slices = int(sum(int((c > 0).sum()) for c in counts))
    parts = [np.repeat(1.0 / (n_slices * c[c > 0]), c[c > 0]) for c in counts]
    return np.concatenate(parts) if parts else np.empty(0)


def threshold_at_mean_slice_fpr(
    healthy_maps: Sequence[np.ndarray], brainmasks: Sequence[np.ndarray], fpr: float = 0.05
) -> tuple[float, int]:
    """The smallest healthy value t whose mean per-slice FPR (``map > t``) is at most ``fpr``.

    Args:
        healthy_maps: post-processed maps ``[S, H, W]`` of healthy validation subjects.
        brainmasks: the denominator region of each map (same shapes).
        fpr: target mean per-slice fraction in (0, 1).

    Returns:
        ``(threshold, n_voxels)`` (module doc).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr: expected a fraction in (0, 1), got {fpr}")
    values = _pool(healthy_maps, brainmasks, "maps")
    if values.size == 0:
        raise InputError("healthy FPR calibration: no voxels in the healthy maps' region")
    check_finite_values(values, "healthy FPR calibration: the healthy validation maps")
    weights = _slice_weights(brainmasks)
    order = np.argsort(values, kind="stable")
    sorted_values, sorted_weights = values[order], weights[order]
    # above[i]: weight of the values after position i; at the last position of a run of
    # equal values it is the weight of the values strictly greater than that value.
    above = np.concatenate([np.cumsum(sorted_weights[::-1])[::-1][1:], [0.0]])
    last_of_run = np.append(sorted_values[1:] != sorted_values[:-1], True)
    candidates = np.flatnonzero(last_of_run & (above <= fpr + 1e-12))
    return float(sorted_values[candidates[0]]), int(values.size)


def flagged_fraction(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    threshold: float,
    pooling: FprPooling = "voxels",
) -> float:
    """Fraction of the region flagged by ``map > threshold``, pooled or as a per-slice mean."""
    flagged = [
        np.asarray(m)[np.asarray(b, bool)] > threshold for m, b in zip(maps, masks, strict=True)
    ]
    if pooling == "voxels":
        total = sum(f.size for f in flagged)
        return sum(int(f.sum()) for f in flagged) / total if total else float("nan")
    weights = _slice_weights(masks)
    return (
        float(np.concatenate(flagged).astype(np.float64) @ weights)
        if weights.size
        else float("nan")
    )


def threshold_best_dice(
    maps: Sequence[np.ndarray],
    segs: Sequence[np.ndarray],
    brainmasks: Sequence[np.ndarray],
    n_candidates: int | None = None,
    search: BestDiceSearch = "exact",
) -> tuple[float, float, int]:
    """The threshold maximising Dice of ``map > t`` on pooled validation voxels (cDDPM).

    ``search``: ``exact`` over every distinct value (``n_candidates=None``) or over that
    many quantiles; ``bisection``, cDDPM's 10-step interval bisection over ``[0, max]``
    (which can end below the exact optimum).

    Returns:
        ``(threshold, pooled_dice, n_voxels)``.
    """
    values = _pool(maps, brainmasks, "maps")
    check_finite_values(values, "best-Dice calibration: the validation maps")
    labels = _pool([np.asarray(s) > 0 for s in segs], brainmasks, "segs")
    best, threshold = search_best_dice_threshold(
        values, labels, search=search, n_candidates=n_candidates
    )
    if math.isnan(best):
        raise InputError("best-Dice calibration: no lesion voxels inside the brain masks")
    return threshold, best, int(values.size)


def calibrate(
    protocol: Protocol,
    *,
    maps: Sequence[np.ndarray],
    brainmasks: Sequence[np.ndarray],
    subjects: Sequence[str],
    dataset: str | Sequence[str],
    postprocess: PostprocessConfig,
    splits: Sequence[str],
    scores_files: Sequence[str],
    segs: Sequence[np.ndarray] | None = None,
    target_fpr: float | None = None,
    n_candidates: int | None = None,
    search: BestDiceSearch = "exact",
    fpr_region: FprRegion = "brain",
    fpr_pooling: FprPooling = "voxels",
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one protocol and return its JSON-ready record.

    Args:
        protocol: ``"healthy_fpr"`` or ``"best_dice_val"``.
        maps: post-processed validation maps, one per subject.
        brainmasks: evaluated regions (eroded brain masks).
        subjects: the subjects behind ``maps``, recorded.
        dataset: dataset name(s) of the validation data, recorded.
        postprocess: the post-processing that made ``maps``, recorded so that metrics can
            refuse a threshold made under other post-processing.
        splits: the ``split`` attribute of each scores file behind ``maps``, as read (the
            caller checks them); recorded, and ``uses_test_data`` is derived from them.
        scores_files: the scores files behind ``maps``, recorded.
        segs: lesion masks (``best_dice_val`` only).
        target_fpr: flagged fraction (``healthy_fpr`` only).
        n_candidates, search: see :func:`threshold_best_dice` (``best_dice_val`` only).
        fpr_region: what ``brainmasks`` are for ``healthy_fpr`` (``brain`` or ``image``,
            module doc); recorded.
        fpr_pooling: ``voxels`` or ``per_slice_mean`` (``healthy_fpr`` only; module doc).
        evaluation: the evaluation mode and grid the maps are on
            (:meth:`brainuad.evaluation.grid.EvaluationConfig.record`), recorded.
    """
    if len(subjects) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(subjects)} subjects")
    if len(splits) != len(scores_files) or not scores_files:
        raise ValueError(
            f"expected one split per scores file, got {len(splits)} splits for "
            f"{len(scores_files)} files"
        )
    record: dict[str, Any] = {"protocol": protocol, "target_fpr": None}
    if protocol == "healthy_fpr":
        if target_fpr is None:
            raise ValueError("healthy_fpr calibration needs target_fpr")
        if fpr_region not in FPR_REGIONS or fpr_pooling not in FPR_POOLINGS:
            raise ValueError(
                f"healthy FPR denominator: expected region in {FPR_REGIONS} and pooling in "
                f"{FPR_POOLINGS}, got {fpr_region!r}, {fpr_pooling!r}"
            )
        if fpr_pooling == "voxels":
            threshold, n = threshold_at_healthy_fpr(maps, brainmasks, target_fpr)
        else:
            threshold, n = threshold_at_mean_slice_fpr(maps, brainmasks, target_fpr)
        record.update(
            target_fpr=float(target_fpr),
            threshold=threshold,
            achieved_fpr_val=flagged_fraction(maps, brainmasks, threshold, fpr_pooling),
            fpr_denominator={"region": fpr_region, "pooling": fpr_pooling},
        )
        uses_pixel_labels = False
    elif protocol == "best_dice_val":
        if segs is None:
            raise ValueError("best_dice_val calibration needs segs")
        threshold, best, n = threshold_best_dice(maps, segs, brainmasks, n_candidates, search)
        record.update(
            threshold=threshold, pooled_dice_val=best, n_candidates=n_candidates, search=search
        )
        if search == "bisection":
            record["bisection_steps"] = BISECTION_STEPS
        uses_pixel_labels = True
    else:
        raise ValueError(f"protocol: expected healthy_fpr or best_dice_val, got {protocol!r}")
    if not math.isfinite(threshold):
        raise InputError(f"{protocol} calibration on {list(scores_files)}: threshold {threshold}")
    distinct_splits = sorted({str(split) for split in splits})
    record["chosen_on"] = {
        "dataset": dataset if isinstance(dataset, str) else list(dataset),
        "split": distinct_splits[0] if len(distinct_splits) == 1 else distinct_splits,
        "scores_files": [str(path) for path in scores_files],
        "subjects": [str(s) for s in subjects],
        "n_voxels": n,
        "uses_pixel_labels": uses_pixel_labels,
        "uses_test_data": "test" in distinct_splits,
    }
    record["postprocess"] = postprocess.to_dict()
    record["evaluation"] = dict(evaluation or {"mode": "brain_mask"})
    record["provenance"] = provenance()
    return record


def threshold_entries(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Protocol name -> entry, from a whole ``threshold.json`` dict or its ``thresholds`` part
    (or a plain ``{name: float}`` mapping, returned as is)."""
    return record.get("thresholds", record)


def threshold_values(thresholds: Mapping[str, Any]) -> dict[str, float]:
    """Protocol name -> threshold, from anything :func:`threshold_entries` reads."""
    entries = threshold_entries(thresholds)
    out = {}
    for name, entry in entries.items():
        value = entry["threshold"] if isinstance(entry, dict) else entry
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            out[name] = math.nan
        if not math.isfinite(out[name]):
            raise InputError(
                f"threshold {name!r} is {value!r}, expected a finite number; recalibrate "
                "(delete the threshold.json it came from and rerun snakemake)"
            )
    return out
