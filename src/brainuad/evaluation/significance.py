"""Significance between methods: paired tests and bootstrap confidence intervals over subjects.

The main table gives mean ± standard deviation over folds, the spread between training runs;
it does not say whether two methods differ beyond the chance of which subjects were tested.
This module answers that, per dataset and metric (by default Dice at the headline protocol
and AUPRC):

1. :func:`subject_values` reduces the per-subject metric files to one value per (method,
   dataset, subject): the mean over the folds that tested the subject. Every fold tests the
   same subjects (:mod:`brainuad.slices.splits`: the healthy test set and a lesion cohort's
   test split are shared by all folds), so a subject's fold mean is the method's result on
   that subject, and two methods pair on the subject id. Subjects without a value (NaN
   Dice where the region holds no lesion) are left out.
2. :func:`pairwise_tests` runs a two-sided Wilcoxon signed-rank test (the result of
   :func:`scipy.stats.wilcoxon`: zero differences dropped as Wilcoxon did, exact null
   distribution for small samples; :func:`wilcoxon_pair`) for every pair of methods over their
   common subjects, and adjusts the p-values of one dataset and metric together with
   Holm's step-down procedure (:func:`holm_adjust`; Holm, "A simple sequentially rejective
   multiple test procedure", Scand. J. Statist. 1979).
3. :func:`confidence_intervals` gives each method's mean over subjects with a percentile
   bootstrap confidence interval (:func:`bootstrap_ci`; Efron & Tibshirani 1993, ch. 13).

Pairs that cannot be tested get NaN p-values and a ``reason``: fewer than ``min_pairs``
common subjects (with 5 pairs the smallest two-sided exact p is 2 / 2^5 = 0.0625), or all
differences zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import rankdata, wilcoxon

from brainuad.config import ConfigError
from brainuad.errors import InputError
from brainuad.evaluation.tables import (
    _md_escape,
    _md_table,
    _tex_table,
    collect_metrics,
    display_order,
    infer_metric_info,
    latex_escape,
    table_stem,
)
from brainuad.io.atomic import write_text_atomic

SIGNIFICANCE_COLUMNS = [
    "dataset",
    "metric",
    "method_a",
    "method_b",
    "n_pairs",
    "median_difference",
    "statistic",
    "p_value",
    "p_holm",
    "significant",
    "better",
    "reason",
]
"""Columns of ``significance.csv``: one row per dataset, metric and pair of methods.

``median_difference`` is the median of ``method_a - method_b`` over the paired subjects;
``statistic`` is scipy's two-sided Wilcoxon statistic (the smaller of the positive and
negative rank sums); ``better`` is the method whose values rank higher (the larger rank sum
of its side of the differences, turned by the metric's direction), empty when untested or
tied; ``significant`` is ``p_holm < alpha``."""

CI_COLUMNS = [
    "method",
    "dataset",
    "metric",
    "n_subjects",
    "mean",
    "ci_low",
    "ci_high",
    "confidence",
    "n_resamples",
    "reason",
]
"""Columns of ``confidence_intervals.csv``: one row per method, dataset and metric."""


class SignificanceSettings(NamedTuple):
    """``evaluation.significance`` of the config (see ``config/schema.yaml``)."""

    min_pairs: int = 5
    alpha: float = 0.05
    bootstrap_resamples: int = 10000
    confidence: float = 0.95

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> SignificanceSettings:
        """The settings of the config block (its ``metrics`` key is read by
        :func:`significance_metrics`; the schema refuses unknown keys)."""
        return cls(**{key: options[key] for key in cls._fields if key in options})


DEFAULT_SETTINGS = SignificanceSettings()


def significance_metrics(
    options: Mapping[str, Any], default_protocol: str, protocols: Sequence[str]
) -> list[str]:
    """The metric columns tested: ``evaluation.significance.metrics``, or by default Dice at
    the headline protocol and AUPRC (the main table's metrics).

    Raises:
        ConfigError: a metric this project does not know, or a protocol not calibrated
            (``protocols``), named with the key.
    """
    metrics = options.get("metrics") or [f"dice@{default_protocol}", "auprc"]
    for metric in metrics:
        try:
            infer_metric_info(metric)
        except InputError as error:
            raise ConfigError(f"evaluation.significance.metrics: {error}") from None
        protocol = metric.partition("@")[2]
        if protocol and protocol not in protocols:
            raise ConfigError(
                f"evaluation.significance.metrics: {metric!r} names protocol {protocol!r}, "
                f"which is not calibrated; expected one of {list(protocols)}"
            )
    return list(metrics)


# --------------------------------------------------------------------------- statistics


def subject_values(long: pd.DataFrame) -> pd.DataFrame:
    """One value per (method, dataset, metric, subject): the mean over folds.

    Args:
        long: :func:`brainuad.evaluation.tables.collect_metrics` output.

    Returns:
        Columns ``method, dataset, metric, subject, value``; only finite values (folds
        without a value are left out of the mean, subjects without any are dropped).
    """
    rows = long[np.isfinite(long["value"].to_numpy(dtype=float))]
    grouped = rows.groupby(["method", "dataset", "metric", "subject"], sort=True)["value"]
    return grouped.mean().reset_index()


class PairedTest(NamedTuple):
    """A two-sided Wilcoxon signed-rank test of ``a - b`` over paired subjects."""

    n_pairs: int
    median_difference: float
    statistic: float
    p_value: float
    direction: int  # +1: a ranks higher, -1: b ranks higher, 0: tied or untested
    reason: str  # why untested ("" when tested)


#: scipy.stats.wilcoxon(method="auto") enumerates the sign flips of up to this many
#: differences when some are tied or zero (a permutation test of 2^n resamples, seconds per
#: call); :func:`signed_rank_exact_p` computes the same distribution in milliseconds.
EXACT_TIES_MAX_PAIRS = 13


def signed_rank_exact_p(differences: np.ndarray) -> float:
    """Two-sided p of the Wilcoxon signed-rank statistic under the exact sign-flip null.

    Zero differences are dropped; the others are ranked by absolute value (midranks for
    ties) and, under the null, each carries a + or - sign with probability 1/2 independently.
    The distribution of the positive rank sum W+ over the 2^m sign patterns is counted by
    dynamic programming on doubled (integer) ranks; p = 2 min(P(W+ <= w), P(W+ >= w)),
    at most 1. Without ties this is the classical exact test; with ties it is the
    permutation distribution that scipy enumerates for small samples.
    """
    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return math.nan
    doubled = np.rint(2 * rankdata(np.abs(nonzero))).astype(np.int64)
    counts = np.zeros(int(doubled.sum()) + 1)
    counts[0] = 1.0
    for rank in doubled:
        shifted = counts.copy()
        shifted[rank:] += counts[:-rank]
        counts = shifted
    observed = int(doubled[nonzero > 0].sum())
    lower, upper = counts[: observed + 1].sum(), counts[observed:].sum()
    return float(min(1.0, 2 * min(lower, upper) / counts.sum()))


def wilcoxon_pair(a: np.ndarray, b: np.ndarray, *, min_pairs: int = 5) -> PairedTest:
    """Wilcoxon signed-rank test of paired values ``a[i]``, ``b[i]`` (same subject).

    The result is that of ``scipy.stats.wilcoxon(a, b, zero_method="wilcox",
    method="auto")``: zero differences dropped; exact null distribution for up to 50
    differences without ties or zeros, normal approximation (tie-corrected) above; for up
    to :data:`EXACT_TIES_MAX_PAIRS` pairs with ties or zeros the exact sign-flip
    distribution, computed here by :func:`signed_rank_exact_p` rather than by scipy's
    permutation test (same value, a thousand times faster). The statistic is the smaller
    rank sum; the direction compares the positive and negative rank sums, the quantity the
    test is about.

    Returns:
        A :class:`PairedTest`; NaN statistic and p-value, with a reason, when there are
        fewer than ``min_pairs`` pairs or every difference is zero.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"wilcoxon_pair: expected two equal 1D arrays, got {a.shape}, {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("wilcoxon_pair: values must be finite (drop unpaired subjects first)")
    difference = a - b
    n = int(difference.size)
    median = float(np.median(difference)) if n else math.nan
    if n < min_pairs:
        return PairedTest(n, median, math.nan, math.nan, 0, f"fewer than {min_pairs} pairs")
    nonzero = difference[difference != 0]
    if nonzero.size == 0:
        return PairedTest(n, median, math.nan, math.nan, 0, "all differences zero")
    ranks = rankdata(np.abs(nonzero))
    r_plus, r_minus = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    tied = np.unique(np.abs(nonzero)).size < nonzero.size or nonzero.size < n
    if tied and n <= EXACT_TIES_MAX_PAIRS:
        p_value = signed_rank_exact_p(difference)
    else:
        result = wilcoxon(a, b, zero_method="wilcox", alternative="two-sided", method="auto")
        p_value = float(result.pvalue)
    direction = int(np.sign(r_plus - r_minus))
    return PairedTest(n, median, min(r_plus, r_minus), p_value, direction, "")


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given.

    With the m finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    value of ``p_(i)`` is ``min(1, max_{j <= i} (m - j + 1) p_(j))``: the running maximum
    keeps the adjusted values in the order of the raw ones. Rejecting where the adjusted
    value is below alpha controls the family-wise error rate at alpha. NaN entries
    (untested pairs) stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    if tested.size == 0:
        return adjusted
    if ((p[tested] < 0) | (p[tested] > 1)).any():
        raise InputError(f"holm_adjust: p-values must lie in [0, 1], got {p[tested]}")
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    ``n_resamples`` resamples of ``len(values)`` values drawn with replacement
    (``numpy.random.default_rng(seed)``); the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of their means. The same seed and length give the
    same resampled indices, so methods evaluated on the same subjects (in the same order)
    are resampled together.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise InputError(f"bootstrap_ci: expected at least 2 finite values, got {x}")
    if not 0 < confidence < 1:
        raise InputError(f"bootstrap_ci: confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise InputError(f"bootstrap_ci: n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def pairwise_tests(
    values: pd.DataFrame,
    *,
    settings: SignificanceSettings = DEFAULT_SETTINGS,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    metric_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every pair of methods on every dataset and metric of ``values``
    (:func:`subject_values`), Holm-adjusted within each dataset and metric.

    Returns:
        Columns :data:`SIGNIFICANCE_COLUMNS`; ``method_a`` comes before ``method_b`` in
        ``method_order``.
    """
    rows = []
    for dataset in display_order(values["dataset"], dataset_order):
        for metric in display_order(values["metric"], metric_order):
            block = values[(values["dataset"] == dataset) & (values["metric"] == metric)]
            if block.empty:
                continue
            higher_is_better = infer_metric_info(metric).higher_is_better
            by_method = {
                method: group.set_index("subject")["value"]
                for method, group in block.groupby("method", sort=False)
            }
            family = []
            for method_a, method_b in combinations(display_order(by_method, method_order), 2):
                paired = pd.concat(
                    [by_method[method_a], by_method[method_b]], axis=1, join="inner"
                ).sort_index()
                test = wilcoxon_pair(
                    paired.iloc[:, 0].to_numpy(),
                    paired.iloc[:, 1].to_numpy(),
                    min_pairs=settings.min_pairs,
                )
                sign = {True: 1, False: -1, None: 0}[higher_is_better]
                better = {1: method_a, -1: method_b}.get(test.direction * sign, "")
                family.append(
                    {
                        "dataset": dataset,
                        "metric": metric,
                        "method_a": method_a,
                        "method_b": method_b,
                        "n_pairs": test.n_pairs,
                        "median_difference": test.median_difference,
                        "statistic": test.statistic,
                        "p_value": test.p_value,
                        "better": better,
                        "reason": test.reason,
                    }
                )
            adjusted = holm_adjust([row["p_value"] for row in family])
            for row, p_holm in zip(family, adjusted, strict=True):
                row["p_holm"] = p_holm
                row["significant"] = bool(p_holm < settings.alpha)
            rows += family
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)


def confidence_intervals(
    values: pd.DataFrame,
    *,
    settings: SignificanceSettings = DEFAULT_SETTINGS,
    seed: int = 0,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    metric_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean over subjects and its bootstrap interval (:func:`bootstrap_ci`, one ``seed``
    for every cell) per method, dataset and metric of ``values`` (:func:`subject_values`).

    Returns:
        Columns :data:`CI_COLUMNS`; NaN interval with a reason for fewer than 2 subjects.
    """
    rows = []
    for dataset in display_order(values["dataset"], dataset_order):
        for metric in display_order(values["metric"], metric_order):
            block = values[(values["dataset"] == dataset) & (values["metric"] == metric)]
            for method in display_order(block["method"], method_order):
                x = block[block["method"] == method].sort_values("subject")["value"].to_numpy()
                low = high = math.nan
                reason = "fewer than 2 subjects" if x.size < 2 else ""
                if not reason:
                    low, high = bootstrap_ci(
                        x,
                        n_resamples=settings.bootstrap_resamples,
                        confidence=settings.confidence,
                        seed=seed,
                    )
                rows.append(
                    {
                        "method": method,
                        "dataset": dataset,
                        "metric": metric,
                        "n_subjects": int(x.size),
                        "mean": float(x.mean()) if x.size else math.nan,
                        "ci_low": low,
                        "ci_high": high,
                        "confidence": settings.confidence,
                        "n_resamples": settings.bootstrap_resamples,
                        "reason": reason,
                    }
                )
    return pd.DataFrame(rows, columns=CI_COLUMNS)


# --------------------------------------------------------------------------- rendering


def format_p(p: float) -> str:
    """``"< 0.001"`` below a thousandth, three decimals otherwise, ``"n/a"`` for NaN."""
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def metric_label(metric: str) -> str:
    """``"Dice, threshold: 5 % FPR on healthy validation"`` for ``dice@healthy_fpr_5``."""
    info = infer_metric_info(metric)
    label = info.display_name + (" (oracle)" if info.is_oracle else "")
    return f"{label}, {info.protocol}" if info.protocol else label


def _matrix_cells(tests: pd.DataFrame, methods: list[str]) -> list[list[tuple[str, bool]]]:
    """Upper triangle of one dataset and metric: row ``methods[i]`` (i < last) against
    column ``methods[j]`` (j > 0); ``(text, significant)`` per cell, blank below."""
    lookup = {(r.method_a, r.method_b): r for r in tests.itertuples()}
    cells = []
    for i, row_method in enumerate(methods[:-1]):
        line = []
        for j, column_method in enumerate(methods[1:], start=1):
            record = lookup.get((row_method, column_method)) if j > i else None
            if record is None:
                line.append(("", False))
                continue
            mark = {row_method: ">", column_method: "<"}.get(record.better, "=")
            text = format_p(record.p_holm)
            if not math.isnan(record.p_holm):
                text = f"{mark} {text}"
            line.append((text, bool(record.significant)))
        cells.append(line)
    return cells


def _significance_caption(dataset: str, metric: str, alpha: float) -> str:
    return (
        f"Paired Wilcoxon signed-rank tests over test subjects, {dataset}, "
        f"{metric_label(metric)}: Holm-adjusted p of the row method against the column "
        "method; > where the row method is better, < where the column method is; "
        f"bold where p < {alpha:g}; n/a: not tested (reason in significance.csv)."
    )


def render_significance_tables(
    tests: pd.DataFrame, *, method_order: Sequence[str] | None = None, alpha: float = 0.05
) -> dict[str, str]:
    """One method × method matrix per dataset and metric: ``{"md", "tex", "csv"}``."""
    md_parts, tex_parts = [], []
    for (dataset, metric), block in tests.groupby(["dataset", "metric"], sort=False):
        methods = display_order(pd.concat([block["method_a"], block["method_b"]]), method_order)
        if len(methods) < 2:
            continue
        cells = _matrix_cells(block, methods)
        caption = _significance_caption(dataset, metric, alpha)
        md_body = [
            [_md_escape(methods[i])]
            + [f"**{text}**" if bold and text else _md_escape(text) for text, bold in line]
            for i, line in enumerate(cells)
        ]
        md_parts.append(
            f"**Table: {_md_escape(caption)}**\n\n"
            + _md_table(["Method", *map(_md_escape, methods[1:])], md_body)
        )
        tex_body = [
            [latex_escape(methods[i])]
            + [
                rf"\textbf{{{latex_escape(text)}}}" if bold and text else latex_escape(text)
                for text, bold in line
            ]
            for i, line in enumerate(cells)
        ]
        header = [" & ".join(["Method", *map(latex_escape, methods[1:])]) + r" \\"]
        label = f"significance_{table_stem(dataset)}_{table_stem(metric)}"
        table = _tex_table(caption, label, header, tex_body, len(methods))
        tex_parts.append(_fit_to_width(_tex_comparisons(table)))
    if not md_parts:
        note = "No dataset has two methods with values to compare.\n"
        md_parts, tex_parts = [note], [f"% {note}"]
    return {
        "md": "\n".join(md_parts),
        "tex": "\n".join(tex_parts),
        "csv": tests.to_csv(index=False),
    }


def _fit_to_width(latex: str) -> str:
    """Shrink the tabular of a :func:`_tex_table` float to the line width where it is wider
    (method matrices grow with the methods); needs the graphicx package besides booktabs."""
    fit = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
    latex = latex.replace("\\begin{tabular}", fit + "\n\\begin{tabular}", 1)
    return latex.replace("\\end{tabular}", "\\end{tabular}%\n}", 1)


def _tex_comparisons(latex: str) -> str:
    """``<`` and ``>`` in math mode: in LaTeX's default text font encoding they print as
    inverted exclamation and question marks."""
    return latex.replace("<", "$<$").replace(">", "$>$")


def _ci_text(row: Any, scale: float, decimals: int) -> str:
    if math.isnan(row.mean):
        return "–"
    text = f"{row.mean * scale:.{decimals}f}"
    if not math.isnan(row.ci_low):
        text += f" [{row.ci_low * scale:.{decimals}f}, {row.ci_high * scale:.{decimals}f}]"
    return text


def render_ci_table(
    intervals: pd.DataFrame,
    *,
    method_order: Sequence[str] | None = None,
    dataset_order: Sequence[str] | None = None,
    metric_order: Sequence[str] | None = None,
) -> dict[str, str]:
    """Methods × (dataset, metric): "mean [low, high]", percent for fractions."""
    methods = display_order(intervals["method"], method_order)
    datasets = display_order(intervals["dataset"], dataset_order)
    metrics = display_order(intervals["metric"], metric_order)
    columns = [(d, m) for d in datasets for m in metrics]
    lookup = {(r.method, r.dataset, r.metric): r for r in intervals.itertuples()}
    counts = intervals.groupby("dataset")["n_subjects"].max().to_dict()
    body = []
    for method in methods:
        line = []
        for dataset, metric in columns:
            info = infer_metric_info(metric)
            row = lookup.get((method, dataset, metric))
            scale = 100.0 if info.is_fraction else 1.0
            line.append("–" if row is None else _ci_text(row, scale, info.decimals))
        body.append(line)
    confidence = float(intervals["confidence"].iloc[0]) if len(intervals) else 0.95
    resamples = int(intervals["n_resamples"].iloc[0]) if len(intervals) else 0
    units = " in %" if all(infer_metric_info(m).is_fraction for m in metrics) else ""
    caption = (
        f"Mean over test subjects{units} (each subject's value averaged over the folds) with "
        f"its {100 * confidence:g} % percentile bootstrap confidence interval over subjects "
        f"({resamples} resamples); "
        + "; ".join(metric_label(m) for m in metrics)
        + ". Subjects per dataset (at most): "
        + ", ".join(f"{d} {counts.get(d, 0)}" for d in datasets)
        + "."
    )
    headers = [f"{d} {infer_metric_info(m).display_name}" for d, m in columns]
    markdown = f"**Table: {_md_escape(caption)}**\n\n" + _md_table(
        ["Method", *map(_md_escape, headers)],
        [
            [_md_escape(method), *map(_md_escape, line)]
            for method, line in zip(methods, body, strict=True)
        ],
    )
    tex_header = [" & ".join(["Method", *map(latex_escape, headers)]) + r" \\"]
    tex_body = [
        [latex_escape(method), *map(latex_escape, line)]
        for method, line in zip(methods, body, strict=True)
    ]
    latex = _fit_to_width(
        _tex_table(caption, "confidence_intervals", tex_header, tex_body, 1 + len(columns))
    )
    return {"md": markdown, "tex": latex, "csv": intervals.to_csv(index=False)}


# --------------------------------------------------------------------------- orchestration

Key3 = tuple[str, int, str]


def build_significance_tables(
    *,
    metric_paths: Mapping[Key3, str | os.PathLike],
    metrics: Sequence[str],
    datasets: Sequence[str],
    settings: SignificanceSettings,
    seed: int,
    significance_stem: str | os.PathLike,
    intervals_stem: str | os.PathLike,
    method_order: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the per-subject metric files of ``datasets``, test every pair of methods, bound
    every mean, and write ``{stem}.csv``, ``.md`` and ``.tex`` for both (atomically).

    Returns:
        ``(tests, intervals)``: :data:`SIGNIFICANCE_COLUMNS` and :data:`CI_COLUMNS` frames.
    """
    wanted = {key: path for key, path in metric_paths.items() if key[2] in set(datasets)}
    if not wanted:
        raise InputError(f"significance: no metric files of the datasets {list(datasets)}")
    values = subject_values(collect_metrics(wanted, metrics=list(metrics)))
    order = {"method_order": method_order, "dataset_order": datasets, "metric_order": metrics}
    tests = pairwise_tests(values, settings=settings, **order)
    intervals = confidence_intervals(values, settings=settings, seed=seed, **order)
    rendered = {
        significance_stem: render_significance_tables(
            tests, method_order=method_order, alpha=settings.alpha
        ),
        intervals_stem: render_ci_table(intervals, **order),
    }
    for stem, texts in rendered.items():
        for suffix, text in texts.items():
            write_text_atomic(Path(f"{stem}.{suffix}"), text)
    return tests, intervals
