"""Tests of brainuad.evaluation.significance: Wilcoxon tests against scipy, Holm against a
hand computation, bootstrap intervals, pairing over subjects and folds, degenerate inputs,
and the written tables and figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainuad.config import ConfigError
from brainuad.evaluation.figures import plot_pairwise_significance
from brainuad.evaluation.significance import (
    CI_COLUMNS,
    SIGNIFICANCE_COLUMNS,
    SignificanceSettings,
    bootstrap_ci,
    build_significance_tables,
    confidence_intervals,
    holm_adjust,
    pairwise_tests,
    signed_rank_exact_p,
    significance_metrics,
    subject_values,
    wilcoxon_pair,
)


def _long(values: dict[tuple[str, int, str], dict[str, float]], metric="auprc", dataset="brats"):
    """collect_metrics-style frame from {(method, fold, dataset): {subject: value}}."""
    rows = [
        {
            "method": method,
            "fold": fold,
            "dataset": dataset,
            "subject": subject,
            "has_lesion": True,
            "metric": metric,
            "value": value,
        }
        for (method, fold, dataset), by_subject in values.items()
        for subject, value in by_subject.items()
    ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- Wilcoxon


def _paired(n: int, seed: int, *, zero: bool = False, tie: bool = False):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, n)
    b = a - rng.normal(0.1, 0.2, n)
    if zero:
        b[0] = a[0]
    if tie:
        b[2] = a[2] - (a[1] - b[1])  # |d_2| = |d_1|: tied ranks
    return a, b


@pytest.mark.parametrize(
    ("n", "zero", "tie"),
    [
        (12, False, False),  # scipy: exact null distribution
        (7, True, True),  # scipy: permutation test over all 2^7 sign flips
        (20, True, True),  # scipy: normal approximation with tie correction
        (60, False, False),  # scipy: normal approximation
    ],
)
def test_wilcoxon_pair_matches_scipy(n, zero, tie):
    a, b = _paired(n, seed=n, zero=zero, tie=tie)
    test = wilcoxon_pair(a, b)
    expected = stats.wilcoxon(a, b, zero_method="wilcox", method="auto")
    assert test.n_pairs == n
    assert test.statistic == pytest.approx(expected.statistic)
    assert test.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert test.median_difference == pytest.approx(np.median(a - b))
    assert test.reason == ""


def test_signed_rank_exact_p_against_enumeration():
    """The dynamic programme against brute force over all 2^10 sign patterns, with a zero
    and tied absolute differences."""
    d = np.array([0.0, 0.3, -0.3, 0.1, 0.5, -0.2, 0.4, 0.4, 0.7, 0.6])
    nonzero = d[d != 0]
    ranks = stats.rankdata(np.abs(nonzero))
    signs = np.array(np.meshgrid(*[[0, 1]] * nonzero.size)).reshape(nonzero.size, -1).T
    w_plus = signs @ ranks
    observed = ranks[nonzero > 0].sum()
    expected = min(1.0, 2 * min((w_plus <= observed).mean(), (w_plus >= observed).mean()))
    assert signed_rank_exact_p(d) == pytest.approx(expected)
    assert math.isnan(signed_rank_exact_p(np.zeros(3)))


def test_wilcoxon_pair_exact_value_and_direction():
    # All six differences positive: W- = 0, exact two-sided p = 2 / 2^6.
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    b = a - np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    test = wilcoxon_pair(a, b)
    assert test.statistic == 0.0
    assert test.p_value == pytest.approx(2 / 64)
    assert test.direction == 1
    assert wilcoxon_pair(b, a).direction == -1


def test_wilcoxon_pair_degenerate_inputs():
    few = wilcoxon_pair(np.arange(4.0), np.zeros(4), min_pairs=5)
    assert math.isnan(few.p_value) and few.reason == "fewer than 5 pairs" and few.n_pairs == 4
    same = wilcoxon_pair(np.ones(6), np.ones(6))
    assert math.isnan(same.p_value) and same.reason == "all differences zero"
    assert math.isnan(wilcoxon_pair(np.array([]), np.array([])).median_difference)
    with pytest.raises(Exception, match="finite"):
        wilcoxon_pair(np.array([1.0, np.nan]), np.array([1.0, 2.0]), min_pairs=2)


# ----------------------------------------------------------------------------- Holm


def test_holm_against_hand_computation():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04, which
    # the running maximum (monotonicity step) raises to 0.06.
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # NaN (untested) stays NaN and does not count: m = 2; capped at 1.
    adjusted = holm_adjust([0.5, np.nan, 0.6])
    np.testing.assert_allclose(adjusted, [1.0, np.nan, 1.0])
    assert np.isnan(holm_adjust([np.nan, np.nan])).all()
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        holm_adjust([1.5])


# ------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_mean_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(7)
    small, large = rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 160)
    low, high = bootstrap_ci(small, n_resamples=2000, seed=3)
    assert low < small.mean() < high
    large_low, large_high = bootstrap_ci(large, n_resamples=2000, seed=3)
    assert large_low < large.mean() < large_high
    # the interval's width goes as 1 / sqrt(n): 16x the subjects, about a quarter the width
    assert 0.15 < (large_high - large_low) / (high - low) < 0.4
    assert bootstrap_ci(small, n_resamples=2000, seed=3) == (low, high)
    assert bootstrap_ci(small, n_resamples=2000, seed=4) != (low, high)
    # scipy's percentile bootstrap (other draws) agrees to Monte-Carlo error
    reference = stats.bootstrap(
        (small,), np.mean, n_resamples=2000, method="percentile", random_state=0
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.01)
    assert high == pytest.approx(reference.high, abs=0.01)
    with pytest.raises(Exception, match="at least 2"):
        bootstrap_ci([0.5])


# ------------------------------------------------------------------- pairing, tables


def test_subject_values_average_folds_and_drop_missing():
    long = _long(
        {
            ("a", 0, "brats"): {"s1": 0.2, "s2": np.nan},
            ("a", 1, "brats"): {"s1": 0.4, "s2": 0.6},
            ("b", 0, "brats"): {"s1": np.nan},
            ("b", 1, "brats"): {"s1": np.nan},
        }
    )
    values = subject_values(long).set_index(["method", "subject"])["value"]
    assert values[("a", "s1")] == pytest.approx(0.3)
    assert values[("a", "s2")] == pytest.approx(0.6)  # the fold with a value
    assert ("b", "s1") not in values.index


def test_pairwise_tests_pair_subjects_across_methods():
    rng = np.random.default_rng(2)
    subjects = [f"s{i}" for i in range(9)]
    base = dict(zip(subjects, rng.uniform(0.2, 0.8, 9), strict=True))
    a = {fold: {s: v + 0.05 + rng.normal(0, 0.02) for s, v in base.items()} for fold in (0, 1)}
    b = {fold: {s: v + rng.normal(0, 0.02) for s, v in base.items()} for fold in (0, 1)}
    del b[0]["s0"], b[1]["s0"]  # b lacks s0: 8 pairs
    b_shuffled = {fold: dict(reversed(list(v.items()))) for fold, v in b.items()}
    c = {0: {"s1": 0.5, "s2": 0.5}}  # too few subjects to pair
    long = _long(
        {("a", f, "brats"): a[f] for f in a}
        | {("b", f, "brats"): b_shuffled[f] for f in b}
        | {("c", 0, "brats"): c[0]}
    )
    tests = pairwise_tests(subject_values(long), method_order=["a", "b", "c"])
    assert list(tests.columns) == SIGNIFICANCE_COLUMNS
    row = tests.set_index(["method_a", "method_b"]).loc[("a", "b")]
    paired = subjects[1:]
    mean_a = np.array([(a[0][s] + a[1][s]) / 2 for s in paired])
    mean_b = np.array([(b[0][s] + b[1][s]) / 2 for s in paired])
    expected = stats.wilcoxon(mean_a, mean_b)
    assert row["n_pairs"] == 8
    assert row["p_value"] == pytest.approx(expected.pvalue)
    assert row["better"] == "a"
    untested = tests[tests["method_b"] == "c"]
    assert untested["p_value"].isna().all() and untested["p_holm"].isna().all()
    assert set(untested["reason"]) == {"fewer than 5 pairs"}
    assert (untested["better"] == "").all() and not untested["significant"].any()
    # the only tested pair of the family: Holm leaves its p unchanged
    assert row["p_holm"] == pytest.approx(row["p_value"])
    # for a lower-is-better metric the same data make b the better method
    flipped = pairwise_tests(subject_values(long.assign(metric="hd95@healthy_fpr_5")))
    assert flipped.set_index(["method_a", "method_b"]).loc[("a", "b"), "better"] == "b"


def test_confidence_intervals_per_method():
    long = _long(
        {("a", 0, "brats"): {f"s{i}": 0.1 * i for i in range(6)}, ("b", 0, "brats"): {"s0": 0.3}}
    )
    settings = SignificanceSettings(bootstrap_resamples=500)
    intervals = confidence_intervals(subject_values(long), settings=settings, seed=1)
    assert list(intervals.columns) == CI_COLUMNS
    a, b = intervals.set_index("method").loc["a"], intervals.set_index("method").loc["b"]
    assert a["n_subjects"] == 6 and a["mean"] == pytest.approx(0.25)
    assert a["ci_low"] < 0.25 < a["ci_high"] and a["n_resamples"] == 500
    assert b["n_subjects"] == 1 and math.isnan(b["ci_low"]) and b["reason"]


def test_significance_metrics_defaults_and_checks():
    protocols = ["healthy_fpr_5", "best_dice_val"]
    assert significance_metrics({}, "healthy_fpr_5", protocols) == [
        "dice@healthy_fpr_5",
        "auprc",
    ]
    chosen = {"metrics": ["dice@best_dice_val", "auprc"]}
    assert significance_metrics(chosen, "healthy_fpr_5", protocols) == chosen["metrics"]
    with pytest.raises(ConfigError, match="not calibrated"):
        significance_metrics({"metrics": ["dice@healthy_fpr_9"]}, "healthy_fpr_5", protocols)
    with pytest.raises(ConfigError, match=r"evaluation\.significance\.metrics"):
        significance_metrics({"metrics": ["sharpness"]}, "healthy_fpr_5", protocols)


def test_build_significance_tables_writes_files_and_figure(tmp_path):
    rng = np.random.default_rng(5)
    paths = {}
    for method, shift in (("ae", 0.0), ("ddpm", 0.1), ("cddpm", 0.2)):
        for fold in (0, 1):
            for dataset, n in (("brats", 6), ("ixi", 3)):
                frame = pd.DataFrame(
                    {
                        "subject": [f"sub-{i}" for i in range(n)],
                        "has_lesion": dataset == "brats",
                        "dice@healthy_fpr_5": np.linspace(0.2, 0.6, n)
                        + shift * (1 + 0.1 * np.arange(n)),
                        "auprc": rng.uniform(0, 1, n),
                        "fpr@healthy_fpr_5": rng.uniform(0, 0.1, n),
                    }
                )
                paths[(method, fold, dataset)] = tmp_path / f"{method}{fold}{dataset}.csv"
                frame.to_csv(paths[(method, fold, dataset)], index=False)
    tests, intervals = build_significance_tables(
        metric_paths=paths,
        metrics=["dice@healthy_fpr_5", "auprc"],
        datasets=["brats"],
        settings=SignificanceSettings(bootstrap_resamples=200),
        seed=0,
        significance_stem=tmp_path / "tables" / "significance",
        intervals_stem=tmp_path / "tables" / "confidence_intervals",
        method_order=["ae", "ddpm", "cddpm"],
    )
    assert set(tests["dataset"]) == {"brats"} and len(tests) == 2 * 3
    dice = tests[tests["metric"] == "dice@healthy_fpr_5"].set_index(["method_a", "method_b"])
    # cddpm beats ae on every one of the 6 subjects: exact p 2 / 64, Holm over 3 pairs
    assert dice.loc[("ae", "cddpm"), "better"] == "cddpm"
    assert dice.loc[("ae", "cddpm"), "p_value"] == pytest.approx(2 / 64)
    assert dice.loc[("ae", "cddpm"), "p_holm"] == pytest.approx(3 * 2 / 64)
    assert len(intervals) == 3 * 2
    written = pd.read_csv(tmp_path / "tables" / "significance.csv")
    assert list(written.columns) == SIGNIFICANCE_COLUMNS
    markdown = (tmp_path / "tables" / "significance.md").read_text()
    assert "| Method | ddpm | cddpm |" in markdown and "**< 0.094**" not in markdown
    assert "< 0.094" in markdown  # ae < cddpm, Holm p = 0.09375
    latex = (tmp_path / "tables" / "significance.tex").read_text()
    assert latex.count(r"\begin{table}") == 2 and r"\label{tab:significance_brats_auprc}" in latex
    assert "$<$ 0.094" in latex  # comparison signs in math mode (text mode prints ¡ ¿)
    ci_md = (tmp_path / "tables" / "confidence_intervals.md").read_text()
    assert "brats Dice" in ci_md and "[" in ci_md
    assert (tmp_path / "tables" / "confidence_intervals.tex").exists()
    fig = plot_pairwise_significance(
        written, tmp_path / "sig.png", tmp_path / "sig.pdf", method_order=["ae", "ddpm", "cddpm"]
    )
    assert len(fig.axes) == 2 + 1  # two metric panels and the colour bar
    assert (tmp_path / "sig.png").stat().st_size > 0 and (tmp_path / "sig.pdf").exists()
