"""Evaluation orchestration: what the Snakemake scripts of ``rules/evaluate.smk`` call.

:func:`calibrate_from_scores` turns validation scores into the ``threshold.json`` dict;
:func:`subject_metrics_table` turns one test scores file and those thresholds into one row
per subject plus slice-level metrics. Definitions of every metric are in
:mod:`brainuad.evaluation.metrics`.

Columns of the subject table (``<p>`` is a protocol name from ``threshold.json``:
``healthy_fpr_5``, ``healthy_fpr_1``, ``best_dice_val/<dataset>``):

=======================================  ===================================================
column                                   meaning
=======================================  ===================================================
subject, n_slices                        subject id, slices scored
has_lesion                               any lesion voxel inside the evaluated region
region_voxels                            voxels of the evaluated region (eroded brain mask;
                                         every voxel of the reference grid in ``reference``
                                         mode, :mod:`brainuad.evaluation.grid`)
true_volume_voxels, true_volume_ml       lesion volume inside the region
auroc, auprc                             voxel-wise, threshold-free
oracle_dice, oracle_threshold            best Dice over thresholds on this volume (ORACLE:
                                         chosen with its test labels; an upper bound only)
dice@<p>, hd95@<p>                       at the protocol's threshold, after post-processing
                                         (NaN without lesion voxels, as lesion_precision,
                                         lesion_recall and lesion_f1)
fpr@<p>                                  flagged fraction of non-lesion region voxels
pred_volume_voxels@<p>, pred_volume_ml@<p>
lesion_tp@<p>, lesion_fp@<p>, lesion_fn@<p>, lesion_precision@<p>, lesion_recall@<p>,
lesion_f1@<p>                            lesion-wise detection (3D components)
recon_l1, recon_l1_brain, recon_ssim     reconstruction quality on healthy slices (only
                                         when the scores file has reconstructions)
mse_healthy_region, mse_anomaly_region,
ssim_healthy_region, ssim_anomaly_region GenAI_UAD normative components (idem)
=======================================  ===================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from brainuad.errors import InputError
from brainuad.evaluation.calibration import (
    FprPooling,
    FprRegion,
    calibrate,
    protocol_name,
    threshold_entries,
    threshold_values,
)
from brainuad.evaluation.grid import EvaluationConfig, evaluate_volume
from brainuad.evaluation.metrics import (
    BestDiceSearch,
    ImageScore,
    reconstruction_quality,
    region_reconstruction_errors,
    slice_detection_metrics,
    slice_scores,
    subject_volume_metrics,
)
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.evaluation.volumes import iter_subject_volumes
from brainuad.io.scores import ScoresFile
from brainuad.provenance import provenance
from brainuad.slices.hdf5 import SliceFile

PathPair = tuple[str | os.PathLike, str | os.PathLike]


def _dataset_name(scores: ScoresFile, slices: SliceFile) -> str:
    return str(scores.attrs.get("dataset", slices.path.stem))


def _require_val(scores: ScoresFile) -> str:
    """The scores file's ``split`` attribute, which must say ``val``: a file that does not
    say where its subjects come from could be a test split."""
    if "split" not in scores.attrs:
        raise InputError(
            f"{scores.path}: no attribute 'split'; calibration takes scores files whose "
            "'split' is 'val' only"
        )
    split = scores.attrs["split"]
    if split != "val":
        raise InputError(
            f"{scores.path}: attribute 'split' is {split!r}; calibration takes 'val' scores only"
        )
    return str(split)


class _Validation(NamedTuple):
    dataset: str
    split: str
    scores_file: str
    subjects: list[str]
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    segs: list[np.ndarray]
    brains: list[np.ndarray]
    images: list[np.ndarray]


def _load_val(pair: PathPair, cfg: PostprocessConfig, evaluation: EvaluationConfig) -> _Validation:
    """Validation maps on the evaluation grid: ``masks`` are the evaluated regions, ``brains``
    and ``images`` the two healthy-FPR denominators."""
    slices, scores = SliceFile(pair[0]), ScoresFile(pair[1])
    split = _require_val(scores)
    val = _Validation(
        _dataset_name(scores, slices), split, str(scores.path), [], [], [], [], [], []
    )
    for vol in iter_subject_volumes(slices, scores):
        evaluated = evaluate_volume(vol, cfg, evaluation)
        val.maps.append(evaluated.post_map)
        val.masks.append(evaluated.region)
        val.segs.append(evaluated.lesion)
        val.brains.append(evaluated.brain)
        val.images.append(evaluated.image)
        val.subjects.append(vol.subject)
    return val


def calibrate_from_scores(
    *,
    healthy_val: Sequence[PathPair],
    lesion_val: Mapping[str, PathPair],
    postprocess: PostprocessConfig,
    fprs: Sequence[float] = (0.05, 0.01),
    n_candidates: int | None = None,
    evaluation: EvaluationConfig | None = None,
    best_dice_search: BestDiceSearch = "exact",
    fpr_region: FprRegion = "brain",
    fpr_pooling: FprPooling = "voxels",
) -> dict[str, Any]:
    """All calibration protocols of one method and fold, as the ``threshold.json`` dict.

    Args:
        healthy_val: ``(slice_path, scores_path)`` of healthy validation splits; their maps
            are pooled for every ``healthy_fpr_<percent>`` protocol.
        lesion_val: dataset -> ``(slice_path, scores_path)`` of a lesion cohort's validation
            split; one ``best_dice_val/<dataset>`` protocol each.
        postprocess: post-processing applied before thresholding (recorded).
        fprs: target healthy false-positive fractions.
        n_candidates: threshold candidates for best Dice (None: exact).
        evaluation: the evaluation mode and grid (default ``brain_mask``); recorded.
        best_dice_search: ``exact`` or ``bisection`` (cDDPM's), recorded.
        fpr_region, fpr_pooling: the healthy-FPR denominator
            (:mod:`brainuad.evaluation.calibration`), recorded.

    Each protocol records the scores files it used and their ``split`` attributes.

    Raises:
        InputError: a scores file without a ``split`` attribute or whose ``split`` is not
            ``val``, or a healthy validation subject with lesion voxels.
    """
    evaluation = evaluation or EvaluationConfig()
    recorded = evaluation.record()
    thresholds: dict[str, Any] = {}
    if healthy_val:
        datasets, splits, files, subjects, maps, masks = [], [], [], [], [], []
        for pair in healthy_val:
            val = _load_val(pair, postprocess, evaluation)
            sick = [s for s, g in zip(val.subjects, val.segs, strict=True) if g.any()]
            if sick:
                raise InputError(
                    f"{pair[1]}: healthy validation subjects with lesion voxels: {sick[:5]}"
                )
            datasets.append(val.dataset)
            splits.append(val.split)
            files.append(val.scores_file)
            names = val.subjects
            subjects += [f"{val.dataset}/{s}" for s in names] if len(healthy_val) > 1 else names
            maps += val.maps
            masks += val.brains if fpr_region == "brain" else val.images
        for fpr in fprs:
            thresholds[protocol_name("healthy_fpr", target_fpr=fpr)] = calibrate(
                "healthy_fpr",
                maps=maps,
                brainmasks=masks,
                subjects=subjects,
                dataset=datasets[0] if len(datasets) == 1 else datasets,
                postprocess=postprocess,
                splits=splits,
                scores_files=files,
                target_fpr=fpr,
                fpr_region=fpr_region,
                fpr_pooling=fpr_pooling,
                evaluation=recorded,
            )
        del maps, masks, val
    for dataset, pair in lesion_val.items():
        val = _load_val(pair, postprocess, evaluation)
        thresholds[protocol_name("best_dice_val", dataset=dataset)] = calibrate(
            "best_dice_val",
            maps=val.maps,
            brainmasks=val.masks,
            segs=val.segs,
            subjects=val.subjects,
            dataset=dataset,
            postprocess=postprocess,
            splits=[val.split],
            scores_files=[val.scores_file],
            n_candidates=n_candidates,
            search=best_dice_search,
            evaluation=recorded,
        )
    settings = {
        "postprocess": postprocess.to_dict(),
        "evaluation": recorded,
        "best_dice_search": best_dice_search,
        "healthy_fpr_denominator": {"region": fpr_region, "pooling": fpr_pooling},
    }
    return {"thresholds": thresholds, "provenance": provenance(settings)}


def _check_postprocess(
    thresholds: Mapping[str, Any], cfg: PostprocessConfig, evaluation: EvaluationConfig
) -> None:
    """Refuse thresholds calibrated under other post-processing or another evaluation grid
    (a threshold on one grid's maps means something else on another's)."""
    for name, entry in threshold_entries(thresholds).items():
        recorded = entry.get("postprocess") if isinstance(entry, dict) else None
        if recorded is not None and PostprocessConfig.from_dict(recorded) != cfg:
            raise InputError(
                f"threshold {name!r} was calibrated with postprocess {recorded}, "
                f"expected {cfg.to_dict()}"
            )
        grid = entry.get("evaluation") if isinstance(entry, dict) else None
        if grid is not None and grid != evaluation.record():
            raise InputError(
                f"threshold {name!r} was calibrated in evaluation {grid}, expected "
                f"{evaluation.record()} (recalibrate: delete the threshold.json)"
            )


def subject_metrics_table(
    *,
    slice_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    thresholds: Mapping[str, Any],
    postprocess: PostprocessConfig,
    image_score: ImageScore = "max",
    voxel_volume_ml: float | None = None,
    spacing: tuple[float, float, float] | None = None,
    evaluation: EvaluationConfig | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Metrics of every subject in one scores file (module doc lists the columns).

    Args:
        slice_path, scores_path: the slice file and the scores of one split of it.
        thresholds: ``threshold.json`` content (or ``{protocol: threshold}``).
        postprocess: must equal the post-processing recorded with each threshold.
        image_score: slice score statistic for slice-level detection.
        voxel_volume_ml: volume of one voxel in ml (volumes in ml are NaN without it).
        spacing: voxel size ``(slice, row, column)`` of the evaluation grid for HD95
            (default: voxel units).
        evaluation: evaluation mode and grid (default ``brain_mask``); must equal the one
            recorded with each threshold.

    Returns:
        ``(table, slice_level)``: one row per subject; slice-level AUROC/AUPRC over all
        scored slices with the ``image_score`` used, and ``absent_slices`` (reference
        mode: source slices of the central extent missing from the slice file).
    """
    evaluation = evaluation or EvaluationConfig()
    _check_postprocess(thresholds, postprocess, evaluation)
    values = threshold_values(thresholds)
    slices, scores = SliceFile(slice_path), ScoresFile(scores_path)
    rows: list[dict[str, Any]] = []
    all_scores, all_labels = [], []
    absent = 0
    for vol in iter_subject_volumes(
        slices,
        scores,
        with_images=scores.has_reconstruction,
        with_reconstruction=scores.has_reconstruction,
    ):
        evaluated = evaluate_volume(vol, postprocess, evaluation)
        absent += evaluated.absent_slices
        row: dict[str, Any] = {"subject": vol.subject, "n_slices": int(vol.present.sum())}
        row.update(
            subject_volume_metrics(
                evaluated.post_map,
                evaluated.region,
                evaluated.lesion,
                values,
                postprocess,
                spacing=spacing,
                voxel_volume_ml=voxel_volume_ml,
            )
        )
        if vol.reconstruction is not None and vol.image is not None:
            healthy = vol.present & (vol.label == 0)
            row.update(
                reconstruction_quality(vol.image, vol.reconstruction, vol.brainmask, healthy)
            )
            row.update(
                region_reconstruction_errors(vol.image, vol.reconstruction, vol.brainmask, vol.seg)
            )
        rows.append(row)
        scored = evaluated.slice_scored
        all_scores.append(
            slice_scores(evaluated.post_map, evaluated.slice_region, image_score)[scored]
        )
        all_labels.append(evaluated.slice_labels[scored])
    table = pd.DataFrame(rows)
    if all_scores:
        slice_level = slice_detection_metrics(
            np.concatenate(all_scores), np.concatenate(all_labels)
        )
    else:
        slice_level = slice_detection_metrics(np.empty(0), np.empty(0, dtype=bool))
    slice_level["image_score"] = image_score
    slice_level["absent_slices"] = int(absent)
    slice_level["scores"] = str(Path(scores_path))
    return table, slice_level


def thresholds_for_dataset(record: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The thresholds that apply to ``dataset``'s test split, keyed by protocol.

    Healthy-FPR thresholds apply to every dataset. A ``best_dice_val/<name>`` threshold
    applies only to the dataset it was chosen on and is returned as ``best_dice_val``, so
    every dataset's table has the same column names.
    """
    selected: dict[str, Any] = {}
    for name, entry in threshold_entries(record).items():
        protocol, _, chosen_on = name.partition("/")
        if not chosen_on:
            selected[name] = entry
        elif chosen_on == dataset:
            selected[protocol] = entry
    return selected


def feature_metrics(
    *,
    slice_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    reference_slice_path: str | os.PathLike,
    reference_rows: np.ndarray,
    lpips_weights: str | os.PathLike | None,
    inception_weights: str | os.PathLike | None,
    max_slices: int = 512,
) -> dict[str, Any]:
    """GenAI_UAD's feature-based measures, computed only when their weights are given.

    - ``lpips``: input vs reconstruction on the healthy slices of this split;
    - ``fid``: reconstructions of this split vs healthy training slices
      (``reference_rows`` of ``reference_slice_path``).

    Each entry is ``{"value": float, "skipped": None}`` or ``{"value": NaN, "skipped":
    reason}``; nothing is ever downloaded (see :func:`brainuad.evaluation.metrics.fid`).
    At most ``max_slices`` evenly spaced slices of each set are used.
    """
    from brainuad.evaluation.metrics import fid, lpips

    scores = ScoresFile(scores_path)
    if not scores.has_reconstruction:
        reason = "the method produces no reconstruction"
        return {name: {"value": float("nan"), "skipped": reason} for name in ("lpips", "fid")}
    result = {
        "lpips": lpips(np.empty(0), np.empty(0), weights_path=None),
        "fid": fid(np.empty(0), np.empty(0), weights_path=None),
    }
    if lpips_weights is None and inception_weights is None:
        return result

    def spaced(n: int) -> np.ndarray:
        return np.unique(np.linspace(0, n - 1, min(n, max_slices)).astype(np.int64))

    slices = SliceFile(slice_path)
    positions = spaced(scores.rows.size)
    read = scores.read(positions, reconstruction=True)
    inputs = slices.read(read["row"])
    if lpips_weights is not None:
        healthy = inputs["label"] == 0
        result["lpips"] = lpips(
            inputs["images"][healthy],
            read["reconstruction"][healthy],
            weights_path=lpips_weights,
        )
    if inception_weights is not None:
        reference = SliceFile(reference_slice_path)
        rows = np.asarray(reference_rows)[spaced(len(reference_rows))]
        result["fid"] = fid(
            read["reconstruction"],
            reference.read(rows)["images"],
            weights_path=inception_weights,
        )
    return result


def evaluate_test_split(
    *,
    slice_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    threshold_record: Mapping[str, Any],
    dataset: str,
    postprocess: PostprocessConfig,
    image_score: ImageScore,
    spacing: tuple[float, float, float],
    healthy_slice_path: str | os.PathLike,
    healthy_train_subjects: Sequence[str],
    lpips_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    evaluation: EvaluationConfig | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Everything the ``subject_metrics`` rule reports for one test split.

    ``spacing`` is the slice file's voxel size; HD95 and volumes use the evaluation grid's
    (:meth:`brainuad.evaluation.grid.EvaluationConfig.grid_spacing`). The summary records
    the evaluation mode and grid under ``evaluation``.

    Returns ``(table, summary)``: one row per subject (:func:`subject_metrics_table`, with
    the thresholds that apply to ``dataset``), and a summary with subject means, slice-level
    detection, feature metrics (skipped without weights) and the thresholds used.
    """
    evaluation = evaluation or EvaluationConfig()
    spacing = evaluation.grid_spacing(spacing)
    thresholds = thresholds_for_dataset(threshold_record, dataset)
    table, slice_level = subject_metrics_table(
        slice_path=slice_path,
        scores_path=scores_path,
        thresholds=thresholds,
        postprocess=postprocess,
        image_score=image_score,
        voxel_volume_ml=float(np.prod(spacing)) / 1000.0,
        spacing=spacing,
        evaluation=evaluation,
    )
    absent = slice_level.pop("absent_slices")
    features = feature_metrics(
        slice_path=slice_path,
        scores_path=scores_path,
        reference_slice_path=healthy_slice_path,
        reference_rows=SliceFile(healthy_slice_path).rows_for_subjects(healthy_train_subjects),
        lpips_weights=lpips_weights,
        inception_weights=inception_weights,
    )
    summary = {
        "dataset": dataset,
        "split": "test",
        "evaluation": {**evaluation.record(), "spacing_mm": list(spacing), "absent_slices": absent},
        "n_subjects": len(table),
        "means": table.drop(columns=["subject"]).mean(numeric_only=True).to_dict(),
        "slice_level": {k: v for k, v in slice_level.items() if k != "scores"},
        "feature_metrics": features,
        "thresholds": {name: entry["threshold"] for name, entry in thresholds.items()},
    }
    return table, summary
