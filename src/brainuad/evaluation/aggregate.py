"""Aggregation orchestration: per-subject metrics and scores into tables and figures.

What the report rules call; the table and figure primitives live in
:mod:`brainuad.evaluation.tables` and :mod:`brainuad.evaluation.figures`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainuad.errors import InputError
from brainuad.evaluation.calibration import THRESHOLD_FILE
from brainuad.evaluation.evaluate import thresholds_for_dataset
from brainuad.evaluation.figures import (
    plot_precision_recall,
    plot_qualitative_grid,
    plot_subject_dice_boxplots,
    plot_training_curves,
    pr_curve_from_arrays,
)
from brainuad.evaluation.grid import EvaluationConfig, evaluate_volume
from brainuad.evaluation.postprocess import PostprocessConfig, binarise, postprocess_map
from brainuad.evaluation.tables import (
    collect_metrics,
    display_order,
    fold_means,
    infer_metric_info,
    summarise_over_folds,
    write_tables,
)
from brainuad.evaluation.volumes import iter_subject_volumes
from brainuad.io.atomic import atomic_path
from brainuad.io.readers import read_json
from brainuad.io.scores import ScoresFile
from brainuad.slices.hdf5 import SliceFile

Key3 = tuple[str, int, str]
PathLike = str | os.PathLike


#: Per-subject columns that describe the evaluation rather than score a method (counts and
#: thresholds, by base name): kept in the metrics files, never tabulated.
UNTABULATED_COLUMNS = frozenset(
    {
        "n_slices",
        "has_lesion",
        "region_voxels",
        "true_volume_voxels",
        "oracle_threshold",
        "pred_volume_voxels",
    }
)


def tabulated_metrics(columns: Sequence[str]) -> list[str]:
    """The metric columns that get a table, in column order.

    Raises:
        InputError: for a column that is neither a known metric nor one of
            ``UNTABULATED_COLUMNS``: a metric the tables do not know would otherwise vanish
            from every table without a word.
    """
    known = []
    for column in columns:
        if column.partition("@")[0] in UNTABULATED_COLUMNS:
            continue
        infer_metric_info(column)
        known.append(column)
    return known


def build_tables(
    *,
    metric_paths: Mapping[Key3, PathLike],
    by_metric_dir: PathLike,
    main_dir: PathLike,
    default_protocol: str,
    method_order: Sequence[str],
    dataset_order: Sequence[str],
    lesion_datasets: Sequence[str],
    prevalence_path: PathLike,
    summary_paths: Mapping[Key3, PathLike] | None = None,
    main_protocols: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Mean ± std over folds of every known metric; one table per metric and a main table.

    The main table (Dice and AUPRC, like the cDDPM paper's) shows Dice at each of
    ``main_protocols`` (default: ``default_protocol`` alone) side by side, each column
    naming its protocol, for the lesion cohorts, with their lesion prevalence
    (:func:`lesion_prevalence`, also written to ``prevalence_path``) and the evaluation mode
    (from the metrics summaries) in a note; per-metric tables show every dataset (the
    healthy cohort's false-positive rate is in ``fpr_at_<protocol>``).

    Returns:
        ``(summary, paths written)``; summary columns ``method, dataset, metric, mean, std,
        n_folds, n_subjects``.
    """
    long = collect_metrics(metric_paths)
    prevalence = lesion_prevalence(long)
    metrics = tabulated_metrics(list(dict.fromkeys(long["metric"])))
    long = long[long["metric"].isin(metrics)]
    summary = summarise_over_folds(fold_means(long))
    info = {metric: infer_metric_info(metric) for metric in metrics}
    protocols = list(dict.fromkeys([default_protocol, *(main_protocols or [])]))
    main_metrics = [m for m in (*(f"dice@{p}" for p in protocols), "auprc") if m in metrics]
    notes = [
        evaluation_note(summary_paths or {}),
        prevalence_note(prevalence, lesion_datasets, method_order),
    ]
    Path(by_metric_dir).mkdir(parents=True, exist_ok=True)
    paths = write_tables(
        summary,
        by_metric_dir,
        metrics,
        info,
        main_metrics=main_metrics,
        method_order=method_order,
        dataset_order=dataset_order,
        main_out_dir=main_dir,
        main_datasets=lesion_datasets,
        main_note=" ".join(note for note in notes if note) or None,
    )
    if summary_paths:
        slice_summary = summarise_over_folds(
            slice_level_fold_values(summary_paths), count_name="n_slices"
        )
        # Slice detection needs lesion slices: the healthy cohort has no positive class.
        slice_summary = slice_summary[slice_summary["dataset"].isin(list(lesion_datasets))]
        paths += write_tables(
            slice_summary,
            by_metric_dir,
            list(SLICE_METRICS),
            {metric: infer_metric_info(metric) for metric in SLICE_METRICS},
            main_metrics=None,
            method_order=method_order,
            dataset_order=lesion_datasets,
        )
    with atomic_path(prevalence_path) as tmp:
        prevalence.to_csv(tmp, index=False)
    return summary, [*paths, Path(prevalence_path)]


SLICE_METRICS = ("slice_auroc", "slice_auprc")


def slice_level_fold_values(summary_paths: Mapping[Key3, PathLike]) -> pd.DataFrame:
    """Slice-level detection metrics (from the metrics JSON summaries) as per-fold values,
    in :func:`brainuad.evaluation.tables.fold_means`'s format; ``n`` counts slices, so
    summarise with ``count_name="n_slices"``."""
    rows = []
    for (method, fold, dataset), path in summary_paths.items():
        slice_level = read_json(path, "metrics summary (JSON)")["slice_level"]
        for metric in SLICE_METRICS:
            value = slice_level.get(metric)
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "fold": int(fold),
                    "metric": metric,
                    "mean": float("nan") if value is None else float(value),
                    "n": int(slice_level.get("n_slices", 0)),
                }
            )
    return pd.DataFrame(rows)


def evaluation_note(summary_paths: Mapping[Key3, PathLike]) -> str | None:
    """One sentence naming the evaluation mode of the metrics (``evaluation`` of the metrics
    summaries; a summary without it was made in ``brain_mask`` mode). None without
    summaries.

    Raises:
        InputError: the summaries were made in different modes or grids.
    """
    records = {}
    for path in summary_paths.values():
        record = read_json(path, "metrics summary (JSON)").get("evaluation", {"mode": "brain_mask"})
        key = {k: v for k, v in record.items() if k not in ("absent_slices", "spacing_mm")}
        records[repr(sorted(key.items()))] = (key, path)
    if not records:
        return None
    if len(records) > 1:
        paths = [str(path) for _, path in records.values()]
        raise InputError(
            f"metrics summaries {paths[:3]} were made in different evaluation modes; rerun "
            "the metrics of one study config"
        )
    record, _ = next(iter(records.values()))
    if record["mode"] == "reference":
        return (
            "Evaluation: reference grid (cDDPM): the central "
            f"{record['extent_mm']:g} mm of the slice axis at {record['slice_spacing_mm']:g} mm "
            f"({record['n_slices']} slices), post-processed there, every voxel evaluated."
        )
    return "Evaluation: eroded brain mask of the slice file's slices."


PREVALENCE_COLUMNS = ["dataset", "method", "lesion_prevalence"]


def lesion_prevalence(long: pd.DataFrame) -> pd.DataFrame:
    """Pooled lesion fraction of the evaluated region, per dataset and method.

    The ground truth is the same for every method, but the evaluated region (the eroded
    brain mask) follows each method's post-processing, so the fraction is computed per
    method: lesion voxels over region voxels, summed over every fold's test subjects.

    Returns:
        Columns ``dataset, method, lesion_prevalence``; empty when the metric files lack
        ``true_volume_voxels`` or ``region_voxels``.
    """
    counts = long[long["metric"].isin(["true_volume_voxels", "region_voxels"])]
    if set(counts["metric"]) != {"true_volume_voxels", "region_voxels"}:
        return pd.DataFrame(columns=PREVALENCE_COLUMNS)
    totals = counts.pivot_table(
        index=["dataset", "method"], columns="metric", values="value", aggfunc="sum", sort=False
    )
    totals["lesion_prevalence"] = totals["true_volume_voxels"] / totals["region_voxels"]
    return totals.reset_index()[PREVALENCE_COLUMNS]


def prevalence_note(
    prevalence: pd.DataFrame, datasets: Sequence[str], method_order: Sequence[str]
) -> str | None:
    """One sentence naming each dataset's lesion prevalence (the AUPRC of a random score);
    per method where methods' evaluated regions differ. None without any value."""
    parts = []
    for dataset in datasets:
        rows = prevalence[prevalence["dataset"] == dataset]
        if rows.empty:
            continue
        by_method = dict(zip(rows["method"], 100 * rows["lesion_prevalence"], strict=True))
        shown = {method: f"{value:.2f} %" for method, value in by_method.items()}
        if len(set(shown.values())) == 1:
            parts.append(f"{dataset} {next(iter(shown.values()))}")
        else:
            ordered = display_order(by_method, method_order)
            parts.append(f"{dataset} " + ", ".join(f"{shown[m]} ({m})" for m in ordered))
    if not parts:
        return None
    return (
        "Lesion prevalence (lesion fraction of the evaluated voxels of the test "
        "subjects, the AUPRC of a random score): " + "; ".join(parts) + "."
    )


def _threshold(threshold_path: PathLike, dataset: str, protocol: str) -> float:
    record = read_json(threshold_path, THRESHOLD_FILE)
    entries = thresholds_for_dataset(record, dataset)
    if protocol not in entries:
        raise InputError(f"{threshold_path}: no threshold for protocol {protocol!r}")
    return float(entries[protocol]["threshold"])


def pooled_pr_curve(
    slice_path: PathLike,
    scores_path: PathLike,
    postprocess: PostprocessConfig,
    evaluation: EvaluationConfig | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision-recall curve of post-processed voxel scores pooled over a test split.

    The evaluated voxels of the evaluation mode (:mod:`brainuad.evaluation.grid`); None
    when the split has no lesion voxel there.
    """
    evaluation = evaluation or EvaluationConfig()
    scores, labels = [], []
    for volume in iter_subject_volumes(slice_path, scores_path):
        evaluated = evaluate_volume(volume, postprocess, evaluation)
        scores.append(evaluated.post_map[evaluated.region])
        labels.append(evaluated.lesion[evaluated.region])
    all_labels = np.concatenate(labels) if labels else np.empty(0, dtype=bool)
    if not all_labels.any():
        return None
    return pr_curve_from_arrays(np.concatenate(scores), all_labels)


def largest_lesion_slices(
    slice_path: PathLike, scores_path: PathLike, n_slices: int
) -> list[tuple[str, int]]:
    """``(subject, slice_index)`` of the ``n_slices`` scored slices with the largest lesion
    area, largest first (ties: subject, then slice index). Reads only the segmentations of
    the scored slices labelled as lesion slices."""
    slices = SliceFile(slice_path)
    rows = np.unique(ScoresFile(scores_path).rows)
    rows = rows[slices.labels[rows] > 0]
    if rows.size == 0:
        return []
    try:  # increasing unique rows, as h5py's fancy indexing needs; nothing but 'seg' is read
        areas = (slices.file["seg"][rows] > 0).sum(axis=(1, 2))
    finally:
        slices.close()
    ranked = sorted(
        (-int(area), str(subject), int(index))
        for area, subject, index in zip(
            areas, slices.subjects[rows], slices.slice_indices[rows], strict=True
        )
    )
    return [(subject, index) for _, subject, index in ranked[:n_slices]]


def qualitative_examples(
    *,
    dataset: str,
    methods: Sequence[str],
    slice_path: PathLike,
    scores_paths: Mapping[str, PathLike],
    threshold_paths: Mapping[str, PathLike],
    protocol: str,
    postprocess: Mapping[str, PostprocessConfig],
    n_examples: int,
) -> list[dict[str, Any]]:
    """Fixed example slices of ``dataset``: the test slices with the largest lesion area
    (ties to the first subject and slice in sort order), shown for every method.

    The choice depends on the ground truth only, so every method shows the same slices: the
    lesion areas come from the slice file's segmentations of the scored (test) rows, and
    only the chosen subjects' volumes are assembled for each method (whole volumes, as
    post-processing is 3D).
    """
    chosen = largest_lesion_slices(slice_path, scores_paths[methods[0]], n_examples)
    subjects = {subject for subject, _ in chosen}
    examples = []
    for method in methods:
        threshold = _threshold(threshold_paths[method], dataset, protocol)
        cfg = postprocess[method]
        for volume in iter_subject_volumes(
            slice_path,
            scores_paths[method],
            with_images=True,
            with_reconstruction=True,
            subjects=subjects,
        ):
            indices = [index for subject, index in chosen if subject == volume.subject]
            positions = np.flatnonzero(np.isin(volume.slice_index, indices))
            processed = postprocess_map(volume.anomaly_map, volume.brainmask, cfg)
            binary = binarise(processed, threshold, cfg)
            for position in positions:
                reconstruction = volume.reconstruction
                examples.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "input": volume.image[position, 0],
                        # shown inside the brain, where methods are trained and scored
                        "reconstruction": None
                        if reconstruction is None
                        else reconstruction[position, 0] * volume.brainmask[position],
                        "anomaly_map": processed[position],
                        "thresholded": binary[position].astype(np.float32),
                        "ground_truth": volume.seg[position].astype(np.float32),
                    }
                )
    return examples


def build_figures(
    *,
    metric_paths: Mapping[Key3, PathLike],
    train_logs: Mapping[tuple[str, int], PathLike],
    test_scores: Mapping[Key3, PathLike],
    slices: Mapping[str, PathLike],
    thresholds: Mapping[tuple[str, int], PathLike],
    outputs: Mapping[str, tuple[PathLike, PathLike]],
    lesion_datasets: Sequence[str],
    methods: Sequence[str],
    default_protocol: str,
    postprocess: Mapping[str, PostprocessConfig],
    examples_per_dataset: int = 2,
    figure_fold: int = 0,
    evaluation: EvaluationConfig | None = None,
) -> None:
    """Draw the study's figures; ``outputs`` maps figure name -> (png, pdf).

    Precision-recall curves and qualitative examples use fold ``figure_fold`` (the
    captions say so); box plots use every fold (subject values averaged over folds).
    Precision-recall curves pool the voxels of the evaluation mode; the qualitative
    examples show the slice file's slices, post-processed on that grid, in either mode.
    """
    long = collect_metrics(metric_paths)
    metric = f"dice@{default_protocol}"
    plot_subject_dice_boxplots(
        long[long["dataset"].isin(lesion_datasets)],
        metric,
        *outputs["dice_boxplot"],
        ylabel=f"Dice ({default_protocol})",
        method_order=list(methods),
        dataset_order=list(lesion_datasets),
    )
    curves = {}
    for dataset in lesion_datasets:
        for method in methods:
            curve = pooled_pr_curve(
                slices[dataset],
                test_scores[(method, figure_fold, dataset)],
                postprocess[method],
                evaluation,
            )
            if curve is not None:
                curves[(method, dataset)] = curve
    plot_precision_recall(
        curves, *outputs["pr_curves"], method_order=list(methods), dataset_order=lesion_datasets
    )
    examples = []
    for dataset in lesion_datasets:
        examples += qualitative_examples(
            dataset=dataset,
            methods=methods,
            slice_path=slices[dataset],
            scores_paths={m: test_scores[(m, figure_fold, dataset)] for m in methods},
            threshold_paths={m: thresholds[(m, figure_fold)] for m in methods},
            protocol=default_protocol,
            postprocess=postprocess,
            n_examples=examples_per_dataset,
        )
    plot_qualitative_grid(examples, *outputs["qualitative"])
    logs = {key: pd.read_csv(path) for key, path in train_logs.items()}
    plot_training_curves(logs, *outputs["training_curves"], method_order=list(methods))
