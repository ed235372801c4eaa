"""Aggregation orchestration: per-subject metrics and scores into tables and figures.

What the report rules call; the table and figure primitives live in
:mod:`brainuad.evaluation.tables` and :mod:`brainuad.evaluation.figures`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainuad.errors import InputError
from brainuad.evaluation.evaluate import thresholds_for_dataset
from brainuad.evaluation.figures import (
    plot_precision_recall,
    plot_qualitative_grid,
    plot_subject_dice_boxplots,
    plot_training_curves,
    pr_curve_from_arrays,
)
from brainuad.evaluation.postprocess import (
    PostprocessConfig,
    binarise,
    erode_brainmask,
    postprocess_map,
)
from brainuad.evaluation.tables import (
    collect_metrics,
    fold_means,
    infer_metric_info,
    summarise_over_folds,
    write_tables,
)
from brainuad.evaluation.volumes import iter_subject_volumes
from brainuad.io.atomic import atomic_path, write_text_atomic

Key3 = tuple[str, int, str]
PathLike = str | os.PathLike


def tabulated_metrics(columns: Sequence[str]) -> list[str]:
    """The metric columns that have a table (known base name), in column order."""
    known = []
    for column in columns:
        try:
            infer_metric_info(column)
        except InputError:
            continue
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
    summary_paths: Mapping[Key3, PathLike] | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Mean ± std over folds of every known metric; one table per metric and a main table.

    The main table (Dice at the default protocol and AUPRC, like the cDDPM paper's) shows
    the lesion cohorts; per-metric tables show every dataset (the healthy cohort's false-
    positive rate is in ``fpr_at_<protocol>``).

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
    main_metrics = [m for m in (f"dice@{default_protocol}", "auprc") if m in metrics]
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
    )
    if summary_paths:
        slice_summary = summarise_over_folds(slice_level_fold_values(summary_paths))
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
    main_md = Path(main_dir) / "main.md"
    lines = [
        f"{dataset} {100 * prevalence[dataset]:.2f} %"
        for dataset in lesion_datasets
        if dataset in prevalence
    ]
    note = (
        "\n\nLesion prevalence (lesion fraction of the evaluated brain voxels of the test "
        "subjects, the AUPRC of a random score): " + ", ".join(lines) + ".\n"
    )
    write_text_atomic(main_md, main_md.read_text().rstrip("\n") + note)
    prevalence_csv = Path(main_dir) / "prevalence.csv"
    with atomic_path(prevalence_csv) as tmp:
        pd.Series(prevalence, name="lesion_prevalence").rename_axis("dataset").to_csv(tmp)
    return summary, [*paths, prevalence_csv]


SLICE_METRICS = ("slice_auroc", "slice_auprc")


def slice_level_fold_values(summary_paths: Mapping[Key3, PathLike]) -> pd.DataFrame:
    """Slice-level detection metrics (from the metrics JSON summaries) as per-fold values,
    in :func:`brainuad.evaluation.tables.fold_means`'s format."""
    rows = []
    for (method, fold, dataset), path in summary_paths.items():
        slice_level = json.loads(Path(path).read_text())["slice_level"]
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


def lesion_prevalence(long: pd.DataFrame) -> dict[str, float]:
    """Pooled lesion fraction of the evaluated region per dataset (first fold's rows)."""
    first_fold = long[long["fold"] == long["fold"].min()]
    first_method = first_fold[first_fold["method"] == first_fold["method"].iloc[0]]
    wide = first_method.pivot_table(
        index=["dataset", "subject"], columns="metric", values="value", aggfunc="first"
    )
    if not {"true_volume_voxels", "region_voxels"} <= set(wide.columns):
        return {}
    totals = wide.groupby(level="dataset")[["true_volume_voxels", "region_voxels"]].sum()
    return (totals["true_volume_voxels"] / totals["region_voxels"]).to_dict()


def _threshold(threshold_path: PathLike, dataset: str, protocol: str) -> float:
    record = json.loads(Path(threshold_path).read_text())
    entries = thresholds_for_dataset(record, dataset)
    if protocol not in entries:
        raise InputError(f"{threshold_path}: no threshold for protocol {protocol!r}")
    return float(entries[protocol]["threshold"])


def pooled_pr_curve(
    slice_path: PathLike, scores_path: PathLike, postprocess: PostprocessConfig
) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision-recall curve of post-processed voxel scores pooled over a test split.

    Voxels inside the eroded brain mask; None when the split has no lesion voxel.
    """
    scores, labels = [], []
    for volume in iter_subject_volumes(slice_path, scores_path):
        region = erode_brainmask(volume.brainmask, postprocess)
        processed = postprocess_map(volume.anomaly_map, volume.brainmask, postprocess)
        scores.append(processed[region])
        labels.append(volume.seg[region])
    all_labels = np.concatenate(labels) if labels else np.empty(0, dtype=bool)
    if not all_labels.any():
        return None
    return pr_curve_from_arrays(np.concatenate(scores), all_labels)


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
    (ties to the first subject and slice), shown for every method.

    The choice depends on the ground truth only, so every method shows the same slices.
    """
    first = scores_paths[methods[0]]
    candidates = []
    for volume in iter_subject_volumes(slice_path, first):
        areas = volume.seg.reshape(volume.seg.shape[0], -1).sum(axis=1)
        for position in np.argsort(-areas, kind="stable")[:n_examples]:
            candidates.append((-int(areas[position]), volume.subject, int(position)))
    chosen = sorted(candidates)[:n_examples]
    examples = []
    for method in methods:
        threshold = _threshold(threshold_paths[method], dataset, protocol)
        wanted = {(subject, position) for _, subject, position in chosen}
        for volume in iter_subject_volumes(
            slice_path, scores_paths[method], with_images=True, with_reconstruction=True
        ):
            positions = [p for s, p in wanted if s == volume.subject]
            if not positions:
                continue
            cfg = postprocess[method]
            processed = postprocess_map(volume.anomaly_map, volume.brainmask, cfg)
            binary = binarise(processed, threshold, cfg)
            for position in sorted(positions):
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
) -> None:
    """Draw the study's figures; ``outputs`` maps figure name -> (png, pdf).

    Precision-recall curves and qualitative examples use fold ``figure_fold`` (the
    captions say so); box plots use every fold (subject values averaged over folds).
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
                slices[dataset], test_scores[(method, figure_fold, dataset)], postprocess[method]
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
