"""The paper's figures: per-subject Dice, precision-recall curves, examples, training curves.

Every function draws on its own :class:`matplotlib.figure.Figure` (never the pyplot state
machine, so nothing leaks between calls and no display is needed), saves it as PNG and PDF
atomically, and returns the figure for inspection. Methods keep one colour across figures
(seaborn's colour-blind palette in the order given or first seen).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from brainuad.errors import InputError
from brainuad.evaluation.significance import format_p, metric_label
from brainuad.evaluation.tables import display_order
from brainuad.io.atomic import atomic_path

PNG_DPI = 200
QUALITATIVE_COLUMNS = ("input", "reconstruction", "anomaly_map", "thresholded", "ground_truth")
_QUALITATIVE_TITLES = ("Input", "Reconstruction", "Anomaly map", "Thresholded", "Ground truth")


def save_figure(fig: Figure, out_png: str | os.PathLike, out_pdf: str | os.PathLike) -> None:
    """Save ``fig`` as PNG and PDF, each written to a temporary file then renamed."""
    for path, fmt in ((out_png, "png"), (out_pdf, "pdf")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight")


def method_palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method, stable for a given method order."""
    colours = sns.color_palette("colorblind", n_colors=max(len(methods), 1))
    return dict(zip(methods, colours, strict=False))


# --------------------------------------------------------------------------- Dice boxes


def plot_subject_dice_boxplots(
    long_df: pd.DataFrame,
    metric: str,
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    *,
    ylabel: str | None = None,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
) -> Figure:
    """Box plots of a per-subject metric: x = dataset, hue = method, subjects as points.

    Args:
        long_df: frame from :func:`brainuad.evaluation.tables.collect_metrics`.
        metric: metric column to show, e.g. ``"dice@healthy_fpr_5"``.
        ylabel: y-axis label (defaults to ``metric``).

    Each subject's value is first averaged over folds, so one point is one subject; subjects
    without a value (healthy subjects' NaN Dice) are left out.
    """
    required = ["method", "dataset", "subject", "metric", "value"]
    missing = [column for column in required if column not in long_df.columns]
    if missing:
        raise InputError(f"plot_subject_dice_boxplots: long_df lacks column(s) {missing}")
    rows = long_df[(long_df["metric"] == metric) & long_df["value"].notna()]
    if rows.empty:
        raise InputError(
            f"plot_subject_dice_boxplots: no non-NaN values of metric {metric!r} to plot"
        )
    per_subject = rows.groupby(["method", "dataset", "subject"], sort=False, as_index=False)[
        "value"
    ].mean()
    methods = display_order(per_subject["method"], method_order)
    datasets = display_order(per_subject["dataset"], dataset_order)
    palette = method_palette(methods)

    fig = Figure(figsize=(1.6 + 1.1 * len(datasets) * max(len(methods), 2) / 2, 4.0))
    ax = fig.subplots()
    common = {
        "data": per_subject,
        "x": "dataset",
        "y": "value",
        "hue": "method",
        "order": datasets,
        "hue_order": methods,
        "palette": palette,
        "ax": ax,
    }
    sns.boxplot(**common, showfliers=False, fill=False, linewidth=1.2)
    sns.stripplot(**common, dodge=True, size=3, alpha=0.6, jitter=0.15, legend=False)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel or metric)
    ax.set_ylim(bottom=min(0.0, float(per_subject["value"].min())))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="Method", frameon=False)
    sns.despine(ax=ax)
    fig.tight_layout()
    save_figure(fig, out_png, out_pdf)
    return fig


# --------------------------------------------------------------------------- PR curves


def pr_curve_from_arrays(
    scores: np.ndarray, labels: np.ndarray, max_points: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of pooled voxel scores, thinned to at most ``max_points``.

    Args:
        scores: anomaly scores, any shape (flattened).
        labels: ground truth of the same size, non-zero = lesion.
        max_points: points kept, spread evenly along the curve; both ends are kept.

    Returns:
        ``(precision, recall)``, ordered by decreasing recall as in
        :func:`sklearn.metrics.precision_recall_curve`.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() != 0
    if scores.size == 0:
        raise InputError("pr_curve_from_arrays: scores is empty")
    if scores.size != labels.size:
        raise InputError(
            f"pr_curve_from_arrays: scores has {scores.size} values, labels {labels.size}"
        )
    if not labels.any():
        raise InputError("pr_curve_from_arrays: labels has no positive voxel; recall undefined")
    if max_points < 2:
        raise InputError(f"pr_curve_from_arrays: max_points must be >= 2, got {max_points}")
    precision, recall, _ = precision_recall_curve(labels, scores)
    if precision.size > max_points:
        keep = np.unique(np.linspace(0, precision.size - 1, max_points).round().astype(int))
        precision, recall = precision[keep], recall[keep]
    return precision, recall


def plot_precision_recall(
    curves: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    *,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
) -> Figure:
    """Voxel-level precision-recall curves, one panel per dataset, one line per method.

    Args:
        curves: ``(method, dataset)`` → ``(precision, recall)``, e.g. from
            :func:`pr_curve_from_arrays`.
    """
    if not curves:
        raise InputError("plot_precision_recall: no curves given")
    methods = display_order([method for method, _ in curves], method_order)
    datasets = display_order([dataset for _, dataset in curves], dataset_order)
    palette = method_palette(methods)

    fig = Figure(figsize=(3.2 * len(datasets) + 1.4, 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(datasets), sharex=True, sharey=True, squeeze=False))
    for ax, dataset in zip(axes.ravel(), datasets, strict=True):
        for method in methods:
            if (method, dataset) not in curves:
                continue
            precision, recall = (np.asarray(a, dtype=float) for a in curves[(method, dataset)])
            if precision.shape != recall.shape or precision.size == 0:
                raise InputError(
                    f"plot_precision_recall: curve ({method!r}, {dataset!r}) has precision "
                    f"shape {precision.shape} and recall shape {recall.shape}; expected equal, "
                    "non-empty"
                )
            ax.plot(recall, precision, color=palette[method], label=method, linewidth=1.4)
        ax.set_title(dataset)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("Recall")
        ax.grid(alpha=0.3)
        sns.despine(ax=ax)
    axes.ravel()[0].set_ylabel("Precision")
    handles, labels = [], []
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(
        handles, labels, title="Method", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
    )
    fig.tight_layout()
    save_figure(fig, out_png, out_pdf)
    return fig


# --------------------------------------------------------------------------- examples


def _example_arrays(index: int, example: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    missing = [key for key in ("dataset", "method", *QUALITATIVE_COLUMNS) if key not in example]
    if missing:
        raise InputError(f"plot_qualitative_grid: example {index} lacks key(s) {missing}")
    arrays: dict[str, np.ndarray | None] = {}
    shape = None
    for key in QUALITATIVE_COLUMNS:
        value = example[key]
        if value is None:
            if key != "reconstruction":
                raise InputError(f"plot_qualitative_grid: example {index}: {key!r} is None")
            arrays[key] = None
            continue
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2:
            raise InputError(
                f"plot_qualitative_grid: example {index}: {key!r} has shape {array.shape}; "
                "expected [H, W]"
            )
        if shape is not None and array.shape != shape:
            raise InputError(
                f"plot_qualitative_grid: example {index}: {key!r} has shape {array.shape}, "
                f"the input has {shape}"
            )
        shape = array.shape
        arrays[key] = array
    return arrays


def plot_qualitative_grid(
    examples: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    *,
    image_range: tuple[float, float] | None = None,
    anomaly_range: tuple[float, float] | None = None,
) -> Figure:
    """Grid of examples: one row per example, columns input … ground truth.

    Args:
        examples: dicts with ``dataset``, ``method`` and ``[H, W]`` arrays ``input``,
            ``reconstruction`` (or ``None`` for methods without one), ``anomaly_map``,
            ``thresholded`` and ``ground_truth``.
        image_range: grey-scale range of input and reconstruction; defaults to the
            1st-99th percentile over every input, the same for all rows.
        anomaly_range: colour range of the anomaly maps; defaults to 0 to the 99th
            percentile over every map, the same for all rows, so rows are comparable.

    Binary maps are drawn on a fixed 0-1 scale.
    """
    if not examples:
        raise InputError("plot_qualitative_grid: no examples given")
    rows = [_example_arrays(i, example) for i, example in enumerate(examples)]
    if image_range is None:
        pooled = np.concatenate([row["input"].ravel() for row in rows])
        image_range = tuple(float(v) for v in np.percentile(pooled, [1, 99]))
    if anomaly_range is None:
        pooled = np.concatenate([row["anomaly_map"].ravel() for row in rows])
        anomaly_range = (min(0.0, float(pooled.min())), float(np.percentile(pooled, 99)))
    if anomaly_range[1] <= anomaly_range[0]:
        anomaly_range = (anomaly_range[0], anomaly_range[0] + 1e-6)
    styles = {
        "input": {"cmap": "gray", "vmin": image_range[0], "vmax": image_range[1]},
        "reconstruction": {"cmap": "gray", "vmin": image_range[0], "vmax": image_range[1]},
        "anomaly_map": {"cmap": "inferno", "vmin": anomaly_range[0], "vmax": anomaly_range[1]},
        "thresholded": {"cmap": "gray", "vmin": 0.0, "vmax": 1.0},
        "ground_truth": {"cmap": "gray", "vmin": 0.0, "vmax": 1.0},
    }

    n_rows, n_cols = len(rows), len(QUALITATIVE_COLUMNS)
    fig = Figure(figsize=(1.9 * n_cols + 0.8, 1.9 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    anomaly_image = None
    for r, (example, arrays) in enumerate(zip(examples, rows, strict=True)):
        for c, key in enumerate(QUALITATIVE_COLUMNS):
            ax = axes[r, c]
            ax.set_axis_off()
            if r == 0:
                ax.set_title(_QUALITATIVE_TITLES[c], fontsize=9)
            if arrays[key] is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            image = ax.imshow(arrays[key], interpolation="nearest", **styles[key])
            if key == "anomaly_map":
                anomaly_image = image
        axes[r, 0].text(
            -0.06,
            0.5,
            f"{example['dataset']}\n{example['method']}",
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.subplots_adjust(wspace=0.03, hspace=0.05)
    if anomaly_image is not None:
        # a separate axis under the column, so the colour bar does not shrink the maps
        box = axes[-1, 2].get_position()
        inch = 1.0 / fig.get_figheight()
        cax = fig.add_axes((box.x0, box.y0 - 0.2 * inch, box.width, 0.1 * inch))
        fig.colorbar(anomaly_image, cax=cax, orientation="horizontal", label="anomaly score")
    save_figure(fig, out_png, out_pdf)
    return fig


# --------------------------------------------------------------------------- training


def plot_training_curves(
    logs: Mapping[tuple[str, int | str], pd.DataFrame],
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    *,
    method_order: Sequence[str] | None = None,
) -> Figure:
    """Loss against step: one panel per method, colour = fold, solid train, dashed val.

    Args:
        logs: ``(method, fold)`` → training log with columns ``step``, ``train_loss`` and
            optionally ``val_loss`` (NaN where validation did not run).

    The y axis is logarithmic unless some loss is not positive.
    """
    if not logs:
        raise InputError("plot_training_curves: no training logs given")
    frames = []
    for (method, fold), log in logs.items():
        missing = [column for column in ("step", "train_loss") if column not in log.columns]
        if missing:
            raise InputError(
                f"plot_training_curves: log of ({method!r}, fold {fold}) lacks column(s) "
                f"{missing}; has {list(log.columns)}"
            )
        loss_columns = [c for c in ("train_loss", "val_loss") if c in log.columns]
        long = log.melt(
            id_vars=["step"], value_vars=loss_columns, var_name="split", value_name="loss"
        )
        long["split"] = long["split"].str.removesuffix("_loss")
        long["method"], long["fold"] = str(method), str(fold)
        frames.append(long)
    data = pd.concat(frames, ignore_index=True).dropna(subset=["loss"])
    if data.empty:
        raise InputError("plot_training_curves: every loss value is NaN")
    methods = display_order(data["method"], method_order)
    folds = sorted(data["fold"].unique(), key=lambda f: (len(f), f))
    log_scale = bool((data["loss"] > 0).all())

    fig = Figure(figsize=(3.4 * len(methods) + 1.2, 3.2))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        sns.lineplot(
            data=data[data["method"] == method],
            x="step",
            y="loss",
            hue="fold",
            hue_order=folds,
            style="split",
            style_order=["train", "val"],
            estimator=None,
            sort=True,
            palette="viridis",
            linewidth=1.0,
            ax=ax,
            legend=ax is axes[-1],
        )
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        sns.despine(ax=ax)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, out_png, out_pdf)
    return fig


# --------------------------------------------------------------------------- significance

#: Colour scale limit of the significance figure, in -log10 p (p = 0.001 and below saturate).
SIGNIFICANCE_LOG10_LIMIT = 3.0


def _signed_log_p(block: pd.DataFrame, methods: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Method × method matrix of ±(−log10 Holm p), + where the row method ranks higher, and
    a matrix of cell labels; NaN and no label where a pair was not tested."""
    n = len(methods)
    values = np.full((n, n), np.nan)
    labels = np.full((n, n), "", dtype=object)
    position = {method: i for i, method in enumerate(methods)}
    for row in block.itertuples():
        i, j = position[row.method_a], position[row.method_b]
        if np.isnan(row.p_holm):
            continue
        sign = {row.method_a: 1.0, row.method_b: -1.0}.get(row.better, 0.0)
        magnitude = -np.log10(max(float(row.p_holm), 1e-300))
        text = format_p(float(row.p_holm)).replace("0.", ".") + ("*" if row.significant else "")
        values[i, j], values[j, i] = sign * magnitude, -sign * magnitude
        labels[i, j] = labels[j, i] = text
    return values, labels


def plot_pairwise_significance(
    tests: pd.DataFrame,
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    *,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    metric_order: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> Figure:
    """Pairwise outcomes: one method × method heatmap per dataset (row) and metric (column).

    Args:
        tests: :func:`brainuad.evaluation.significance.pairwise_tests` output
            (``significance.csv``).

    A cell is −log10 of the Holm-adjusted p of the row method against the column method,
    red where the row method is better, blue where the column method is (the matrix
    is antisymmetric); its label is the p-value, starred below ``alpha``; grey cells were
    not tested (too few paired subjects, or no difference), and a panel without any tested
    pair names the reasons.
    """
    required = ["dataset", "metric", "method_a", "method_b", "p_holm", "better", "significant"]
    missing = [column for column in required if column not in tests.columns]
    if missing:
        raise InputError(f"plot_pairwise_significance: tests lack column(s) {missing}")
    if tests.empty:  # a study of one method: say so rather than fail the figures target
        fig = Figure(figsize=(4.0, 1.0))
        fig.text(0.5, 0.5, "No pair of methods to compare", ha="center", va="center")
        save_figure(fig, out_png, out_pdf)
        return fig
    tests = tests.assign(better=tests["better"].fillna("").astype(str))
    datasets = display_order(tests["dataset"], dataset_order)
    metrics = display_order(tests["metric"], metric_order)
    methods = display_order(pd.concat([tests["method_a"], tests["method_b"]]), method_order)
    # Fixed margins (inches) for the method names rather than a layout engine, which
    # measures every label many times over (seconds for a dozen methods).
    cell, margin, top = 0.32, 1.1, 0.9
    side = cell * len(methods)
    width = len(metrics) * (side + margin) + 1.2
    height = len(datasets) * (side + margin) + top
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=margin / width,
        right=1 - 1.2 / width,
        bottom=margin / height,
        top=1 - top / height,
        wspace=margin / side,
        hspace=margin / side,
    )
    axes = fig.subplots(len(datasets), len(metrics), squeeze=False)
    limit = SIGNIFICANCE_LOG10_LIMIT
    for r, dataset in enumerate(datasets):
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            block = tests[(tests["dataset"] == dataset) & (tests["metric"] == metric)]
            values, labels = _signed_log_p(block, methods)
            ax.set_facecolor("0.92")  # untested cells and the diagonal
            sns.heatmap(
                values,
                ax=ax,
                cmap="vlag",
                center=0.0,
                vmin=-limit,
                vmax=limit,
                annot=labels,
                fmt="",
                annot_kws={"fontsize": 6},
                square=True,
                linewidths=0.5,
                linecolor="white",
                xticklabels=methods,
                yticklabels=methods,
                cbar=False,
            )
            if np.isnan(values).all():  # one note rather than a label per untested cell
                reasons = "; ".join(sorted(set(block["reason"].dropna().astype(str)) - {""}))
                ax.text(
                    0.5,
                    0.5,
                    f"not tested:\n{reasons}" if reasons else "not tested",
                    ha="center",
                    va="center",
                    fontsize=8,
                    transform=ax.transAxes,
                    bbox={"facecolor": "white", "edgecolor": "0.6"},
                )
            ax.set_title(f"{dataset}: {metric_label(metric)}", fontsize=8)
            ax.tick_params(labelsize=7)
    colorbar_axes = fig.add_axes((1 - 0.9 / width, 0.5 - 1.5 / height, 0.15 / width, 3.0 / height))
    fig.colorbar(
        axes[0, 0].collections[0],
        cax=colorbar_axes,
        label="−log10 Holm p (+: row method better)",
    )
    fig.suptitle(
        f"Paired Wilcoxon signed-rank tests, Holm-adjusted per panel; * p < {alpha:g}",
        fontsize=10,
        y=1 - 0.3 / height,
    )
    save_figure(fig, out_png, out_pdf)
    return fig
