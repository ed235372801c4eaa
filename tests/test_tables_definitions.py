"""Tables against their definitions: the bold best is chosen on the values as shown (rounded
in display units), a NaN fold among valid ones is left out of mean, std and the fold count,
and the rendered Markdown and LaTeX read exactly as documented for a small hand-made
summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.tables import (
    MetricInfo,
    describe_protocol,
    display_order,
    fold_means,
    infer_metric_info,
    latex_escape,
    render_main_table,
    render_metric_table,
    summarise_over_folds,
    table_stem,
    write_tables,
)


def _summary(means: dict[tuple[str, str, str], float], std=0.01, n_folds=3) -> pd.DataFrame:
    rows = [
        {
            "method": m,
            "dataset": d,
            "metric": metric,
            "mean": v,
            "std": std,
            "n_folds": n_folds,
            "n_subjects": 4,
        }
        for (m, d, metric), v in means.items()
    ]
    return pd.DataFrame(rows)


def _bold_methods(markdown: str) -> list[str]:
    body = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [line.split("|")[1].strip() for line in body if "**" in line]


DICE = {"dice": MetricInfo("Dice", True, None, False)}


def test_bold_best_is_chosen_after_rounding_to_what_is_shown():
    # 60.04 % and 60.00 % both read 60.0: both bold (a displayed tie)
    tied = _summary({("a", "d", "dice"): 0.6004, ("b", "d", "dice"): 0.6000})
    assert _bold_methods(render_metric_table(tied, "dice", DICE)["md"]) == ["a", "b"]
    # 60.04 % reads 60.0, 60.49 % reads 60.5: only b, though both are 0.6 as fractions
    apart = _summary({("a", "d", "dice"): 0.6004, ("b", "d", "dice"): 0.6049})
    assert _bold_methods(render_metric_table(apart, "dice", DICE)["md"]) == ["b"]
    # lower is better; a NaN (missing) cell never wins
    hd = {"hd95": MetricInfo("HD95", False, None, False, is_fraction=False, unit="mm")}
    lower = _summary(
        {("a", "d", "hd95"): 5.04, ("b", "d", "hd95"): 5.01, ("c", "d", "hd95"): math.nan}
    )
    assert _bold_methods(render_metric_table(lower, "hd95", hd)["md"]) == ["a", "b"]
    hd2 = {"hd95": MetricInfo("HD95", False, None, False, False, "mm", 2)}
    assert _bold_methods(render_metric_table(lower, "hd95", hd2)["md"]) == ["b"]
    # all missing: nothing bold
    none = _summary({("a", "d", "dice"): math.nan, ("b", "d", "dice"): math.nan})
    assert _bold_methods(render_metric_table(none, "dice", DICE)["md"]) == []


def test_one_nan_fold_among_valid_ones_is_left_out():
    fold_df = pd.DataFrame(
        {
            "method": ["a"] * 4 + ["b"] * 2,
            "dataset": ["d"] * 6,
            "metric": ["dice"] * 6,
            "fold": [0, 1, 2, 3, 0, 1],
            "mean": [0.5, math.nan, 0.7, 0.9, math.nan, math.nan],
            "n": [3, 0, 2, 4, 0, 0],
        }
    )
    summary = summarise_over_folds(fold_df).set_index("method")
    assert summary.at["a", "mean"] == pytest.approx(0.7)  # not 0.525 (NaN as 0) nor NaN
    assert summary.at["a", "std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert summary.at["a", "n_folds"] == 3
    assert summary.at["a", "n_subjects"] == 2  # the smallest count of a valid fold
    assert math.isnan(summary.at["b", "mean"]) and summary.at["b", "n_folds"] == 0
    assert summary.at["b", "n_subjects"] == 0
    assert list(summary.reset_index().columns) == [
        "method",
        "dataset",
        "metric",
        "mean",
        "std",
        "n_folds",
        "n_subjects",
    ]
    slices = summarise_over_folds(fold_df, count_name="n_slices")
    assert "n_slices" in slices.columns and "n_subjects" not in slices.columns
    with pytest.raises(ValueError, match="count_name: expected one of"):
        summarise_over_folds(fold_df, count_name="n")
    with pytest.raises(InputError, match=r"summarise_over_folds: fold_df: missing column\(s\)"):
        summarise_over_folds(fold_df.drop(columns="n"))


def test_fold_means_are_means_over_subjects_with_a_value():
    long = pd.DataFrame(
        {
            "method": ["a"] * 5,
            "dataset": ["d"] * 5,
            "fold": [0, 0, 0, 1, 1],
            "metric": ["dice"] * 5,
            "value": [0.2, math.nan, 0.6, math.nan, math.nan],
        }
    )
    folds = fold_means(long).set_index("fold")
    assert folds.at[0, "mean"] == pytest.approx(0.4) and folds.at[0, "n"] == 2
    assert math.isnan(folds.at[1, "mean"]) and folds.at[1, "n"] == 0
    assert folds["n"].dtype == int
    with pytest.raises(InputError, match=r"fold_means: long_df: missing column\(s\) \['value'\]"):
        fold_means(long.drop(columns="value"))


def test_metric_table_reads_as_documented():
    summary = _summary(
        {
            ("b", "brats", "dice@healthy_fpr_5"): 0.5,
            ("a|x", "brats", "dice@healthy_fpr_5"): 0.25,
            ("b", "atlas", "dice@healthy_fpr_5"): 0.125,
        },
        std=0.05,
        n_folds=2,
    )
    info = {"dice@healthy_fpr_5": infer_metric_info("dice@healthy_fpr_5")}
    tables = render_metric_table(
        summary,
        "dice@healthy_fpr_5",
        info,
        method_order=["a|x"],
        dataset_order=["atlas", "brats"],
        dataset_names={"atlas": "ATLAS"},
    )
    assert tables["md"] == (
        "**Table: Dice in %; mean ± standard deviation over 2 folds. Threshold: 5 % FPR on "
        "healthy validation (label-free). Best per column in bold (higher is better).**\n\n"
        "| Method (Dice [%]) | ATLAS | brats |\n"
        "| --- | :---: | :---: |\n"
        "| a\\|x | – | 25.0 ± 5.0 |\n"
        "| b | **12.5 ± 5.0** | **50.0 ± 5.0** |\n"
    )
    assert tables["tex"] == (
        "\\begin{table}[t]\n"
        "\\centering\n"
        "\\caption{Dice in \\%; mean $\\pm$ standard deviation over 2 folds. Threshold: 5 \\% "
        "FPR on healthy validation (label-free). Best per column in bold (higher is better).}\n"
        "\\label{tab:dice_at_healthy_fpr_5}\n"
        "\\begin{tabular}{lcc}\n"
        "\\toprule\n"
        "\\multicolumn{1}{l}{Method} & \\multicolumn{2}{c}{Dice [\\%]} \\\\\n"
        "\\cmidrule(lr){2-3}\n"
        " & ATLAS & brats \\\\\n"
        "\\midrule\n"
        "a|x & -- & 25.0 $\\pm$ 5.0 \\\\\n"
        "b & \\textbf{12.5 $\\pm$ 5.0} & \\textbf{50.0 $\\pm$ 5.0} \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "\\end{table}\n"
    )
    assert tables["csv"].splitlines()[0] == "method,dataset,metric,mean,std,n_folds,n_subjects"
    assert tables["csv"].splitlines()[1] == "b,brats,dice@healthy_fpr_5,0.5,0.05,2,4"
    with pytest.raises(InputError, match="summary has no rows for metric 'auprc'"):
        render_metric_table(summary, "auprc", {"auprc": infer_metric_info("auprc")})
    with pytest.raises(InputError, match="metric_info: no entry for metric"):
        render_metric_table(summary, "dice@healthy_fpr_5", {})


def test_main_table_reads_as_documented():
    summary = _summary(
        {
            ("m", "brats", "dice@healthy_fpr_5"): 0.5,
            ("m", "brats", "auprc"): 0.75,
            ("m", "atlas", "dice@healthy_fpr_5"): 0.25,
            ("m", "atlas", "auprc"): 0.5,
        },
        std=math.nan,
        n_folds=1,
    )
    info = {m: infer_metric_info(m) for m in ("dice@healthy_fpr_5", "auprc")}
    tables = render_main_table(summary, info, note="Prevalence 1 %.")
    assert tables["md"] == (
        "**Table: Main results: Dice in %, AUPRC in %; one fold (no standard deviation). "
        "Threshold: 5 % FPR on healthy validation (label-free). Best per column in bold "
        "(higher is better).**\n\n"
        "| Method | brats Dice [%] (5 % healthy FPR, label-free) | brats AUPRC [%] | "
        "atlas Dice [%] (5 % healthy FPR, label-free) | atlas AUPRC [%] |\n"
        "| --- | :---: | :---: | :---: | :---: |\n"
        "| m | **50.0** | **75.0** | **25.0** | **50.0** |\n"
        "\nPrevalence 1 %.\n"
    )
    tex = tables["tex"].splitlines()
    assert tex[4] == "\\begin{tabular}{lcccc}"
    assert tex[6] == " & \\multicolumn{2}{c}{brats} & \\multicolumn{2}{c}{atlas} \\\\"
    assert tex[7] == "\\cmidrule(lr){2-3} \\cmidrule(lr){4-5}"
    dice_header = "Dice [\\%] (5 \\% healthy FPR, label-free)"
    assert tex[8] == f"Method & {dice_header} & AUPRC [\\%] & {dice_header} & AUPRC [\\%] \\\\"
    assert tex[-4:] == [
        "\\end{tabular}",
        "\\par\\smallskip",
        "{\\footnotesize Prevalence 1 \\%.}",
        "\\end{table}",
    ]
    assert "Prevalence" not in tables["csv"]
    assert "\\par" not in render_main_table(summary, info, note="")["tex"]
    with pytest.raises(InputError, match="main_metrics is empty"):
        render_main_table(summary, info, main_metrics=[])
    with pytest.raises(InputError, match=r"metric\(s\) \['hd95'\] not in the summary"):
        render_main_table(summary, info, main_metrics=["hd95"])


def test_captions_name_fold_spans_oracle_and_directions():
    summary = pd.concat(
        [
            _summary({("a", "d", "oracle_dice"): 0.5}, n_folds=2),
            _summary({("b", "d", "oracle_dice"): 0.4}, n_folds=3),
        ]
    )
    info = {"oracle_dice": infer_metric_info("oracle_dice")}
    md = render_metric_table(summary, "oracle_dice", info)["md"]
    assert md.splitlines()[0] == (
        "**Table: Dice (oracle) in %; mean ± standard deviation over 2–3 folds. (oracle): "
        "threshold chosen on the test labels, an upper bound not reachable in practice. "
        "Best per column in bold (higher is better).**"
    )
    volume = {"pred_volume_ml": infer_metric_info("pred_volume_ml")}
    none = _summary({("a", "d", "pred_volume_ml"): 1.234}, n_folds=0)
    md = render_metric_table(none, "pred_volume_ml", volume)["md"]
    assert md.splitlines()[0] == "**Table: Predicted volume in ml; no folds.**"
    assert "| a | 1.23 ± 0.01 |" in md


def test_metric_names_protocols_and_order():
    assert describe_protocol("healthy_fpr_5") == (
        "threshold: 5 % FPR on healthy validation (label-free)"
    )
    assert describe_protocol("healthy_fpr_0_5") == (
        "threshold: 0.5 % FPR on healthy validation (label-free)"
    )
    assert describe_protocol("best_dice_val") == (
        "threshold: best Dice on the lesion validation split (uses validation pixel labels)"
    )
    assert describe_protocol("fixed_0_5") == "threshold: fixed 0 5"
    info = infer_metric_info("hd95@best_dice_val")
    assert info == MetricInfo(
        "HD95",
        False,
        "threshold: best Dice on the lesion validation split (uses validation pixel labels)",
        False,
        False,
        "mm",
        1,
        "best val. Dice, pixel labels",
    )
    assert infer_metric_info("auprc").protocol is None
    with pytest.raises(InputError, match="unknown base name 'dice_x'"):
        infer_metric_info("dice_x@healthy_fpr_5")
    assert table_stem("dice@healthy_fpr_5") == "dice_at_healthy_fpr_5"
    assert table_stem("a b/c@x.y") == "a_b_c_at_x.y"
    assert display_order(["b", "a", "c", "a"], ["c", "z", "a"]) == ["c", "a", "b"]
    assert display_order([2, 1, 2], None) == ["2", "1"]
    assert latex_escape("\\~^±–$") == (
        r"\textbackslash{}\textasciitilde{}\textasciicircum{}$\pm$--\$"
    )


def test_write_tables_refuses_before_writing(tmp_path):
    summary = _summary({("a", "d", "dice"): 0.5})
    info = {"dice": DICE["dice"]}
    with pytest.raises(InputError, match="write_tables: no metrics given"):
        write_tables(summary, tmp_path, [], info)
    with pytest.raises(InputError, match="expected exactly one count column"):
        write_tables(summary.drop(columns="n_subjects"), tmp_path, ["dice"], info)
    both = summary.assign(n_slices=1)
    with pytest.raises(InputError, match="expected exactly one count column"):
        write_tables(both, tmp_path, ["dice"], info)
    with pytest.raises(InputError, match=r"write_tables: summary: missing column\(s\) \['std'\]"):
        write_tables(summary.drop(columns="std"), tmp_path, ["dice"], info)
    with pytest.raises(InputError, match="would overwrite"):
        main = _summary({("a", "d", "main"): 0.5})
        write_tables(main, tmp_path, ["main"], {"main": DICE["dice"]}, main_metrics=["main"])
    assert list(tmp_path.iterdir()) == []
    paths = write_tables(summary, tmp_path / "t", ["dice"], info, main_metrics=["dice"])
    assert sorted(p.name for p in paths) == [
        "dice.csv",
        "dice.md",
        "dice.tex",
        "main.csv",
        "main.md",
        "main.tex",
    ]
