"""Aggregate per-subject metrics into the paper's tables (CSV, Markdown, LaTeX).

The pipeline is three pure steps and one writer:

1. :func:`collect_metrics` reads ``results/metrics/{method}/fold{fold}/{dataset}.csv`` files
   into one long frame, one row per (method, fold, dataset, subject, metric).
2. :func:`fold_means` averages over subjects within each fold (NaN-aware: test subjects
   without a lesion have NaN lesion metrics, such as Dice, and are left out; ``n`` counts
   the subjects used).
3. :func:`summarise_over_folds` gives mean and sample standard deviation (ddof=1) of the
   fold means, so the spread is between training runs, not between subjects.
4. :func:`write_tables` renders one method × dataset table per metric plus the headline
   table ``main`` (Dice at the default threshold protocol and AUPRC per dataset, the layout
   of the main results table of Behrendt et al., "Guided Reconstruction with Conditioned
   Diffusion Models for Unsupervised Anomaly Detection in Brain MRIs",
   https://arxiv.org/abs/2312.04215).

How a metric is shown is described by a :class:`MetricInfo` per metric column;
:func:`infer_metric_info` builds one from the column names the metrics module writes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from brainuad.errors import InputError
from brainuad.io.atomic import write_text_atomic

ID_COLUMNS = ("subject", "has_lesion")
"""Columns of a per-subject metrics CSV that are not metrics."""

DEFAULT_MAIN_METRICS = ("dice@healthy_fpr_5", "auprc")
"""Headline metrics of ``main``: Dice at the default protocol, then AUPRC."""

MISSING_CELL = "–"
"""Shown where a method has no result on a dataset."""

COUNT_COLUMNS = ("n_subjects", "n_slices")
"""What a summary's count column may be called: subjects, or slices for slice-level metrics."""


class MetricInfo(NamedTuple):
    """How one metric column is named, ranked and formatted.

    A plain 4-tuple ``(display_name, higher_is_better, protocol, is_oracle)`` is accepted
    wherever a ``MetricInfo`` is expected; the remaining fields take their defaults.

    Attributes:
        display_name: name in headers, e.g. ``"Dice"``.
        higher_is_better: ``True``/``False`` decides which value is bold in each column;
            ``None`` (e.g. volumes) bolds nothing.
        protocol: how the threshold was chosen, named in the caption, e.g.
            ``"threshold: 5 % FPR on healthy validation"``; ``None`` for threshold-free
            metrics (AUPRC, AUROC) and oracle metrics.
        is_oracle: the value uses the test labels (e.g. best possible Dice); labelled
            "(oracle)" in headers and captions.
        is_fraction: the value lies in [0, 1] and is shown in percent.
        unit: unit of a non-fraction metric, e.g. ``"mm"`` or ``"ml"``.
        decimals: digits after the decimal point in the rendered tables.
        protocol_label: short name of the threshold protocol for column headers of the
            main table, where two protocols stand side by side, e.g.
            ``"5 % healthy FPR, label-free"``.
    """

    display_name: str
    higher_is_better: bool | None
    protocol: str | None
    is_oracle: bool
    is_fraction: bool = True
    unit: str | None = None
    decimals: int = 1
    protocol_label: str | None = None


# base name (the part before "@") -> MetricInfo without protocol
_KNOWN_METRICS: dict[str, MetricInfo] = {
    "dice": MetricInfo("Dice", True, None, False),
    "oracle_dice": MetricInfo("Dice", True, None, True),
    "auprc": MetricInfo("AUPRC", True, None, False),
    "auroc": MetricInfo("AUROC", True, None, False),
    "hd95": MetricInfo("HD95", False, None, False, is_fraction=False, unit="mm"),
    "fpr": MetricInfo("FPR", False, None, False),
    "lesion_tp": MetricInfo("Detected lesions", True, None, False, is_fraction=False),
    "lesion_fp": MetricInfo("False-positive lesions", False, None, False, is_fraction=False),
    "slice_auroc": MetricInfo("Slice AUROC", True, None, False),
    "slice_auprc": MetricInfo("Slice AUPRC", True, None, False),
    "lesion_fn": MetricInfo("Missed lesions", False, None, False, is_fraction=False),
    "lesion_precision": MetricInfo("Lesion precision", True, None, False),
    "lesion_recall": MetricInfo("Lesion recall", True, None, False),
    "lesion_f1": MetricInfo("Lesion F1", True, None, False),
    "recon_l1": MetricInfo("Reconstruction L1", False, None, False, False, None, 4),
    "recon_l1_brain": MetricInfo("Reconstruction L1 (brain)", False, None, False, False, None, 4),
    "recon_ssim": MetricInfo("Reconstruction SSIM", True, None, False),
    "mse_healthy_region": MetricInfo("MSE, healthy region", False, None, False, False, None, 4),
    "mse_anomaly_region": MetricInfo("MSE, anomaly", True, None, False, False, None, 4),
    "ssim_healthy_region": MetricInfo("SSIM, healthy region", True, None, False),
    "ssim_anomaly_region": MetricInfo("SSIM, anomaly", False, None, False),
    "pred_volume_ml": MetricInfo("Predicted volume", None, None, False, False, "ml", 2),
    "true_volume_ml": MetricInfo("Lesion volume", None, None, False, False, "ml", 2),
}


_HEALTHY_FPR = re.compile(r"healthy_fpr_(\d+(?:[._p]\d+)?)")


def describe_protocol(protocol_key: str) -> str:
    """Human-readable threshold protocol from the suffix of a metric name.

    ``"healthy_fpr_5"`` → ``"threshold: 5 % FPR on healthy validation (label-free)"``;
    ``"best_dice_val"`` → ``"threshold: best Dice on the lesion validation split (uses
    validation pixel labels)"``; anything else is named as is.
    """
    match = _HEALTHY_FPR.fullmatch(protocol_key)
    if match:
        percent = re.sub("[_p]", ".", match.group(1))
        return f"threshold: {percent} % FPR on healthy validation (label-free)"
    if protocol_key == "best_dice_val":
        return "threshold: best Dice on the lesion validation split (uses validation pixel labels)"
    return f"threshold: {protocol_key.replace('_', ' ')}"


def protocol_label(protocol_key: str) -> str:
    """Short protocol name for column headers: ``"5 % healthy FPR, label-free"``,
    ``"best val. Dice, pixel labels"``; anything else as is."""
    match = _HEALTHY_FPR.fullmatch(protocol_key)
    if match:
        return f"{re.sub('[_p]', '.', match.group(1))} % healthy FPR, label-free"
    if protocol_key == "best_dice_val":
        return "best val. Dice, pixel labels"
    return protocol_key.replace("_", " ")


def infer_metric_info(metric: str) -> MetricInfo:
    """Build the :class:`MetricInfo` of a metric column named ``base`` or ``base@protocol``.

    Raises:
        InputError: the base name is not one this module knows; pass a ``MetricInfo``
            for it explicitly.
    """
    base, _, protocol_key = metric.partition("@")
    if base not in _KNOWN_METRICS:
        raise InputError(
            f"metric column {metric!r}: unknown base name {base!r}; expected one of "
            f"{sorted(_KNOWN_METRICS)} (optionally followed by '@protocol'), or pass its "
            "MetricInfo explicitly"
        )
    info = _KNOWN_METRICS[base]
    if protocol_key:
        info = info._replace(
            protocol=describe_protocol(protocol_key), protocol_label=protocol_label(protocol_key)
        )
    return info


def _as_metric_info(metric: str, metric_info: Mapping[str, object]) -> MetricInfo:
    if metric not in metric_info:
        raise InputError(f"metric_info: no entry for metric {metric!r}")
    info = metric_info[metric]
    if isinstance(info, MetricInfo):
        return info
    try:
        return MetricInfo(*info)  # type: ignore[misc]
    except TypeError as error:
        raise InputError(
            f"metric_info[{metric!r}] = {info!r}: expected (display_name, higher_is_better, "
            "protocol, is_oracle[, is_fraction, unit, decimals])"
        ) from error


# --------------------------------------------------------------------------- aggregation


def collect_metrics(
    paths: Mapping[tuple[str, int | str, str], str | os.PathLike],
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read per-subject metric CSVs into one long frame.

    Args:
        paths: ``(method, fold, dataset)`` → CSV path with columns ``subject, has_lesion``
            and one column per metric.
        metrics: metric columns to keep; every file must have them. ``None`` keeps every
            column except ``subject`` and ``has_lesion``.

    Returns:
        Columns ``method, fold, dataset, subject, has_lesion, metric, value``; ``fold`` is
        an int, ``value`` a float (NaN kept, e.g. Dice of healthy subjects).
    """
    if not paths:
        raise InputError("collect_metrics: no metric files given (paths is empty)")
    frames = []
    for (method, fold, dataset), path in paths.items():
        frame = pd.read_csv(path)
        missing = [column for column in ID_COLUMNS if column not in frame.columns]
        if metrics is None:
            wanted = [column for column in frame.columns if column not in ID_COLUMNS]
        else:
            wanted = list(metrics)
            missing += [column for column in wanted if column not in frame.columns]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {missing}; expected subject, has_lesion and "
                f"metric columns {wanted}"
            )
        for column in wanted:
            try:
                frame[column] = pd.to_numeric(frame[column]).astype(float)
            except (TypeError, ValueError) as error:
                raise InputError(f"{path}: metric column {column!r} is not numeric") from error
        long = frame.melt(
            id_vars=list(ID_COLUMNS), value_vars=wanted, var_name="metric", value_name="value"
        )
        long.insert(0, "dataset", str(dataset))
        long.insert(0, "fold", int(fold))
        long.insert(0, "method", str(method))
        frames.append(long)
    out = pd.concat(frames, ignore_index=True)
    out["subject"] = out["subject"].astype(str)
    out["has_lesion"] = out["has_lesion"].astype(bool)
    out["value"] = out["value"].astype(float)
    return out[["method", "fold", "dataset", "subject", "has_lesion", "metric", "value"]]


def fold_means(long_df: pd.DataFrame) -> pd.DataFrame:
    """Mean over subjects per (method, dataset, fold, metric), ignoring NaN values.

    Returns:
        Columns ``method, dataset, fold, metric, mean, n``; ``n`` is the number of subjects
        with a value (subjects without a lesion have NaN Dice and other lesion metrics, see
        :mod:`brainuad.evaluation.metrics`, and are not counted). ``mean`` is NaN where
        ``n`` is 0.
    """
    keys = ["method", "dataset", "fold", "metric"]
    _require_columns(long_df, [*keys, "value"], "fold_means: long_df")
    grouped = long_df.groupby(keys, sort=False, dropna=False)["value"]
    out = grouped.agg(mean="mean", n="count").reset_index()
    out["n"] = out["n"].astype(int)
    return out


def summarise_over_folds(fold_df: pd.DataFrame, count_name: str = "n_subjects") -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) of the fold means.

    Folds whose mean is NaN are left out. ``std`` is NaN when fewer than two folds remain.

    Args:
        fold_df: per-fold values, as from :func:`fold_means`.
        count_name: name of the count column, one of :data:`COUNT_COLUMNS`: what ``n``
            of ``fold_df`` counts.

    Returns:
        Columns ``method, dataset, metric, mean, std, n_folds`` and ``count_name``, the
        smallest per-fold count.
    """
    if count_name not in COUNT_COLUMNS:
        raise ValueError(f"count_name: expected one of {COUNT_COLUMNS}, got {count_name!r}")
    keys = ["method", "dataset", "metric"]
    _require_columns(fold_df, [*keys, "fold", "mean", "n"], "summarise_over_folds: fold_df")
    valid = fold_df[fold_df["mean"].notna()]
    grouped = valid.groupby(keys, sort=False)
    out = grouped.agg(
        mean=("mean", "mean"),
        std=("mean", "std"),  # ddof=1: NaN for a single fold
        n_folds=("mean", "count"),
        **{count_name: ("n", "min")},
    ).reset_index()
    # groups whose every fold is NaN vanish above; keep them as NaN rows
    all_keys = fold_df[keys].drop_duplicates()
    out = all_keys.merge(out, on=keys, how="left")
    out["n_folds"] = out["n_folds"].fillna(0).astype(int)
    out[count_name] = out[count_name].fillna(0).astype(int)
    return out.reset_index(drop=True)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; has {list(frame.columns)}")


def _count_column(summary: pd.DataFrame, where: str) -> str:
    present = [column for column in COUNT_COLUMNS if column in summary.columns]
    if len(present) != 1:
        raise InputError(
            f"{where}: expected exactly one count column of {list(COUNT_COLUMNS)}; has "
            f"{list(summary.columns)}"
        )
    return present[0]


# --------------------------------------------------------------------------- formatting


class _Cell(NamedTuple):
    mean: float  # in display units (percent for fractions)
    std: float
    bold: bool

    def text(self, decimals: int) -> str:
        if math.isnan(self.mean):
            return MISSING_CELL
        if math.isnan(self.std):
            return f"{self.mean:.{decimals}f}"
        return f"{self.mean:.{decimals}f} ± {self.std:.{decimals}f}"


def display_order(values: Iterable[object], preferred: Sequence[str] | None) -> list[str]:
    """The distinct ``values`` as strings: those in ``preferred`` first, in its order, then
    the rest in order of first appearance. Tables and figures order methods and datasets
    with it."""
    present = list(dict.fromkeys(str(v) for v in values))
    if preferred is None:
        return present
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def _cells(
    summary: pd.DataFrame,
    metric: str,
    info: MetricInfo,
    methods: list[str],
    dataset: str,
) -> list[_Cell]:
    """Cells of one column (one dataset), best value bold."""
    rows = summary[(summary["metric"] == metric) & (summary["dataset"] == dataset)]
    rows = rows.set_index("method")
    scale = 100.0 if info.is_fraction else 1.0
    means, stds = [], []
    for method in methods:
        if method in rows.index:
            means.append(float(rows.at[method, "mean"]) * scale)
            stds.append(float(rows.at[method, "std"]) * scale)
        else:
            means.append(math.nan)
            stds.append(math.nan)
    # rank by the value the reader sees, so displayed ties are all bold
    shown = np.round(np.array(means, dtype=float), info.decimals)
    bold = np.zeros(len(methods), dtype=bool)
    if info.higher_is_better is not None and np.isfinite(shown).any():
        best = np.nanmax(shown) if info.higher_is_better else np.nanmin(shown)
        bold = shown == best
    return [_Cell(m, s, bool(b)) for m, s, b in zip(means, stds, bold, strict=True)]


def _header(info: MetricInfo) -> str:
    name = info.display_name
    if info.is_oracle:
        name += " (oracle)"
    if info.is_fraction:
        name += " [%]"
    elif info.unit:
        name += f" [{info.unit}]"
    return name


def _fold_phrase(summary: pd.DataFrame) -> str:
    counts = summary.loc[summary["n_folds"] > 0, "n_folds"]
    if counts.empty:
        return "no folds"
    low, high = int(counts.min()), int(counts.max())
    span = str(high) if low == high else f"{low}–{high}"
    if high == 1:
        return "one fold (no standard deviation)"
    return f"mean ± standard deviation over {span} folds"


def _caption(summary: pd.DataFrame, infos: Sequence[MetricInfo], title: str) -> str:
    parts = [title + ";", _fold_phrase(summary) + "."]
    protocols = list(dict.fromkeys(info.protocol for info in infos if info.protocol))
    if protocols:
        text = "; ".join(protocols)
        parts.append(text[:1].upper() + text[1:] + ".")
    if any(info.is_oracle for info in infos):
        parts.append(
            "(oracle): threshold chosen on the test labels, an upper bound not reachable "
            "in practice."
        )
    arrows = {True: "higher is better", False: "lower is better"}
    directions = list(
        dict.fromkeys(arrows[i.higher_is_better] for i in infos if i.higher_is_better is not None)
    )
    if directions:
        parts.append("Best per column in bold (" + "; ".join(directions) + ").")
    return " ".join(parts)


def _metric_title(info: MetricInfo) -> str:
    return _header(info).replace(" [%]", " in %").replace(" [", " in ").rstrip("]")


# Markdown ----------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], body: list[list[str]]) -> str:
    align = ["---"] + [":---:"] * (len(header) - 1)
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _md_cell(cell: _Cell, decimals: int) -> str:
    text = cell.text(decimals)
    return f"**{text}**" if cell.bold else text


# LaTeX -------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (``_``, ``%``, ``&``, …) in plain text."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def _tex_cell(cell: _Cell, decimals: int) -> str:
    text = latex_escape(cell.text(decimals))
    return rf"\textbf{{{text}}}" if cell.bold else text


def _tex_table(
    caption: str,
    label: str,
    header_lines: list[str],
    body: list[list[str]],
    n_columns: int,
    note: str | None = None,
) -> str:
    # a note goes under the tabular, inside the float, so it moves with the table
    note_lines = [r"\par\smallskip", rf"{{\footnotesize {latex_escape(note)}}}"] if note else []
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{tab:{label}}}",
        r"\begin{tabular}{l" + "c" * (n_columns - 1) + "}",
        r"\toprule",
        *header_lines,
        r"\midrule",
        *[" & ".join(row) + r" \\" for row in body],
        r"\bottomrule",
        r"\end{tabular}",
        *note_lines,
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tables


def table_stem(metric: str) -> str:
    """File-name stem of a metric's table: ``dice@healthy_fpr_5`` → ``dice_at_healthy_fpr_5``.

    Use it in the Snakemake rule to name the outputs of :func:`write_tables`.
    """
    stem = metric.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _names(values: list[str], names: Mapping[str, str] | None) -> list[str]:
    return [(names or {}).get(value, value) for value in values]


def _csv_rows(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    rows = summary[summary["metric"].isin(list(metrics))]
    count = _count_column(summary, "summary")
    columns = ["method", "dataset", "metric", "mean", "std", "n_folds", count]
    return rows[columns].reset_index(drop=True)


def render_metric_table(
    summary: pd.DataFrame,
    metric: str,
    metric_info: Mapping[str, object],
    *,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    method_names: Mapping[str, str] | None = None,
    dataset_names: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """One metric as a method × dataset table: ``{"md": ..., "tex": ..., "csv": ...}``."""
    info = _as_metric_info(metric, metric_info)
    rows = summary[summary["metric"] == metric]
    if rows.empty:
        raise InputError(f"summary has no rows for metric {metric!r}")
    methods = display_order(rows["method"], method_order)
    datasets = display_order(rows["dataset"], dataset_order)
    columns = [_cells(summary, metric, info, methods, dataset) for dataset in datasets]
    caption = _caption(rows, [info], _metric_title(info))
    method_labels = _names(methods, method_names)
    dataset_labels = _names(datasets, dataset_names)
    header_cell = _header(info)

    md_header = [_md_escape(f"Method ({header_cell})"), *map(_md_escape, dataset_labels)]
    md_body = [
        [_md_escape(label)] + [_md_cell(column[i], info.decimals) for column in columns]
        for i, label in enumerate(method_labels)
    ]
    markdown = f"**Table: {_md_escape(caption)}**\n\n" + _md_table(md_header, md_body)

    tex_header = [
        rf"\multicolumn{{1}}{{l}}{{Method}} & \multicolumn{{{len(datasets)}}}{{c}}"
        rf"{{{latex_escape(header_cell)}}} \\",
        rf"\cmidrule(lr){{2-{len(datasets) + 1}}}",
        " & ".join(["", *map(latex_escape, dataset_labels)]) + r" \\",
    ]
    tex_body = [
        [latex_escape(label)] + [_tex_cell(column[i], info.decimals) for column in columns]
        for i, label in enumerate(method_labels)
    ]
    latex = _tex_table(caption, table_stem(metric), tex_header, tex_body, len(datasets) + 1)
    csv = _csv_rows(summary, [metric]).to_csv(index=False)
    return {"md": markdown, "tex": latex, "csv": csv}


def render_main_table(
    summary: pd.DataFrame,
    metric_info: Mapping[str, object],
    *,
    main_metrics: Sequence[str] = DEFAULT_MAIN_METRICS,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    method_names: Mapping[str, str] | None = None,
    dataset_names: Mapping[str, str] | None = None,
    note: str | None = None,
) -> dict[str, str]:
    """The headline table: rows = methods, columns = dataset × ``main_metrics``.

    ``note`` (e.g. the lesion prevalence, the AUPRC of a random score) is a line under the
    Markdown table and a footnote-size line under the LaTeX tabular; the CSV omits it, and
    an empty note is left out.

    Returns ``{"md": ..., "tex": ..., "csv": ...}``.
    """
    if not main_metrics:
        raise InputError("render_main_table: main_metrics is empty")
    missing = [m for m in main_metrics if m not in set(summary["metric"])]
    if missing:
        raise InputError(
            f"main table: metric(s) {missing} not in the summary; it has "
            f"{sorted(set(summary['metric']))} (set main_metrics)"
        )
    infos = [_as_metric_info(metric, metric_info) for metric in main_metrics]
    rows = summary[summary["metric"].isin(list(main_metrics))]
    methods = display_order(rows["method"], method_order)
    datasets = display_order(rows["dataset"], dataset_order)
    columns = [
        (info, _cells(summary, metric, info, methods, dataset))
        for dataset in datasets
        for metric, info in zip(main_metrics, infos, strict=True)
    ]
    caption = _caption(rows, infos, "Main results: " + ", ".join(_metric_title(i) for i in infos))
    method_labels = _names(methods, method_names)
    dataset_labels = _names(datasets, dataset_names)
    # Two protocols side by side: each thresholded column names its protocol.
    metric_labels = [
        _header(info) + (f" ({info.protocol_label})" if info.protocol_label else "")
        for info in infos
    ]

    md_header = ["Method"] + [
        _md_escape(f"{dataset} {metric}") for dataset in dataset_labels for metric in metric_labels
    ]
    md_body = [
        [_md_escape(label)] + [_md_cell(cells[i], info.decimals) for info, cells in columns]
        for i, label in enumerate(method_labels)
    ]
    markdown = f"**Table: {_md_escape(caption)}**\n\n" + _md_table(md_header, md_body)
    if note:
        markdown += f"\n{_md_escape(note)}\n"

    k = len(main_metrics)
    group_cells = [
        rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(label)}}}" for label in dataset_labels
    ]
    rules = [rf"\cmidrule(lr){{{2 + j * k}-{1 + (j + 1) * k}}}" for j in range(len(datasets))]
    tex_header = [
        " & ".join(["", *group_cells]) + r" \\",
        " ".join(rules),
        " & ".join(["Method"] + [latex_escape(m) for _ in datasets for m in metric_labels])
        + r" \\",
    ]
    tex_body = [
        [latex_escape(label)] + [_tex_cell(cells[i], info.decimals) for info, cells in columns]
        for i, label in enumerate(method_labels)
    ]
    latex = _tex_table(caption, "main", tex_header, tex_body, 1 + k * len(datasets), note)
    csv = _csv_rows(summary, main_metrics).to_csv(index=False)
    return {"md": markdown, "tex": latex, "csv": csv}


def main_table_markdown(
    summary: pd.DataFrame,
    metric_info: Mapping[str, object],
    **kwargs,
) -> str:
    """Markdown of the headline table, for embedding in the README.

    Keyword arguments are those of :func:`render_main_table`.
    """
    return render_main_table(summary, metric_info, **kwargs)["md"]


def write_tables(
    summary: pd.DataFrame,
    out_dir: str | os.PathLike,
    metrics: Sequence[str],
    metric_info: Mapping[str, object],
    *,
    main_metrics: Sequence[str] | None = DEFAULT_MAIN_METRICS,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    method_names: Mapping[str, str] | None = None,
    dataset_names: Mapping[str, str] | None = None,
    main_out_dir: str | os.PathLike | None = None,
    main_datasets: Sequence[str] | None = None,
    main_note: str | None = None,
) -> list[Path]:
    """Write every table of ``summary`` (from :func:`summarise_over_folds`) under ``out_dir``.

    Files: ``{table_stem(metric)}.{csv,md,tex}`` per metric in ``out_dir``, and
    ``main.{csv,md,tex}`` in ``main_out_dir`` (default ``out_dir``) unless ``main_metrics``
    is ``None``; ``main_datasets`` restricts the main table (e.g. to the lesion cohorts) and
    ``main_note`` is shown under it (:func:`render_main_table`). Cells read "mean ± std"
    (percent for fractions), the best value per dataset column in bold. The CSVs are long and
    numeric, in the metric's own units (fractions stay fractions): ``method, dataset, metric,
    mean, std, n_folds`` and the count column (``n_subjects``, or ``n_slices`` for
    slice-level metrics). Every file is written atomically.

    Returns:
        The paths written.
    """
    _require_columns(
        summary, ["method", "dataset", "metric", "mean", "std", "n_folds"], "write_tables: summary"
    )
    _count_column(summary, "write_tables: summary")
    if not metrics:
        raise InputError("write_tables: no metrics given")
    naming = {
        "method_order": method_order,
        "dataset_order": dataset_order,
        "method_names": method_names,
        "dataset_names": dataset_names,
    }
    out_dir = Path(out_dir)
    # render everything before writing anything, so a bad metric leaves no partial set
    rendered: dict[Path, str] = {}
    for metric in metrics:
        texts = render_metric_table(summary, metric, metric_info, **naming)
        for suffix, text in texts.items():
            rendered[out_dir / f"{table_stem(metric)}.{suffix}"] = text
    if main_metrics is not None:
        main_dir = out_dir if main_out_dir is None else Path(main_out_dir)
        main_summary = summary
        if main_datasets is not None:
            main_summary = summary[summary["dataset"].isin(list(main_datasets))]
        texts = render_main_table(
            main_summary, metric_info, main_metrics=main_metrics, note=main_note, **naming
        )
        for suffix, text in texts.items():
            path = main_dir / f"main.{suffix}"
            if path in rendered:
                raise InputError(f"write_tables: a metric table would overwrite {path}")
            rendered[path] = text
    for path, text in rendered.items():
        write_text_atomic(path, text)
    return list(rendered)
