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
    collect_metrics,
    describe_protocol,
    display_order,
    fold_means,
    infer_metric_info,
    latex_escape,
    protocol_label,
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


# --- reading the per-subject metric files ----------------------------------------------------


def test_collect_metrics_reads_ids_as_written_and_only_the_asked_metrics(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    # numeric subject ids and 0/1 lesion flags, as a spreadsheet would write them
    pd.DataFrame(
        {"subject": [7, 8], "has_lesion": [1, 0], "dice": [0.5, 1], "auprc": [1, 2]}
    ).to_csv(first, index=False)
    pd.DataFrame({"subject": [9], "has_lesion": [1], "dice": [0.25], "auprc": [3]}).to_csv(
        second, index=False
    )
    paths = {("b", 1, "d"): first, ("a", "0", "e"): second}
    long = collect_metrics(paths, metrics=["dice"])
    assert list(long.columns) == [
        "method",
        "fold",
        "dataset",
        "subject",
        "has_lesion",
        "metric",
        "value",
    ]
    assert list(long.index) == [0, 1, 2]
    assert long.to_dict("list") == {
        "method": ["b", "b", "a"],
        "fold": [1, 1, 0],
        "dataset": ["d", "d", "e"],
        "subject": ["7", "8", "9"],
        "has_lesion": [True, False, True],
        "metric": ["dice", "dice", "dice"],
        "value": [0.5, 1.0, 0.25],
    }
    assert long["has_lesion"].dtype == bool and long["value"].dtype == float
    every = collect_metrics(paths)
    assert sorted(set(every["metric"])) == ["auprc", "dice"] and len(every) == 6
    assert list(every.index) == list(range(6))


def test_collect_metrics_names_everything_missing(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["s"], "dice": [0.5]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['has_lesion', 'auprc'\]"):
        collect_metrics({("m", 0, "d"): path}, metrics=["dice", "auprc"])
    with pytest.raises(
        InputError, match=r"^collect_metrics: no metric files given \(paths is empty\)$"
    ):
        collect_metrics({})


def test_tables_list_methods_and_datasets_in_order_of_first_appearance():
    long = pd.DataFrame(
        {
            "method": ["zeta", "zeta", "alpha", "alpha"],
            "dataset": ["z", "a", "z", "a"],
            "fold": [0, 0, 0, 0],
            "metric": ["dice"] * 4,
            "value": [0.5, 0.25, 0.75, math.nan],
        }
    )
    folds = fold_means(long)
    assert list(folds["method"]) == ["zeta", "zeta", "alpha", "alpha"]
    summary = summarise_over_folds(folds)
    assert list(zip(summary["method"], summary["dataset"], strict=True)) == [
        ("zeta", "z"),
        ("zeta", "a"),
        ("alpha", "z"),
        ("alpha", "a"),
    ]
    # an all-NaN group stays, with integer counts
    assert summary["n_folds"].tolist() == [1, 1, 1, 0] and summary["n_folds"].dtype == int
    assert summary["n_subjects"].tolist() == [1, 1, 1, 0] and summary["n_subjects"].dtype == int
    md = render_metric_table(summary, "dice", DICE)["md"].splitlines()
    assert md[2] == "| Method (Dice [%]) | z | a |"
    assert [line.split("|")[1].strip() for line in md[4:]] == ["zeta", "alpha"]


# --- names ----------------------------------------------------------------------------------


def test_protocol_names_with_p_for_the_decimal_point():
    assert describe_protocol("healthy_fpr_0p5") == (
        "threshold: 0.5 % FPR on healthy validation (label-free)"
    )
    assert protocol_label("healthy_fpr_0p5") == "0.5 % healthy FPR, label-free"
    assert protocol_label("healthy_fpr_1") == "1 % healthy FPR, label-free"
    assert protocol_label("fixed_0_5") == "fixed 0 5"
    assert table_stem("Dice@FPR_5") == "Dice_at_FPR_5"


def test_metric_info_errors_say_what_to_pass():
    with pytest.raises(
        InputError,
        match=r"\(optionally followed by '@protocol'\), or pass its "
        r"MetricInfo explicitly$",
    ):
        infer_metric_info("nope")
    summary = _summary({("a", "d", "dice"): 0.5})
    with pytest.raises(
        InputError,
        match=r"^metric_info\['dice'\] = \('Dice',\): expected \(display_name, "
        r"higher_is_better, protocol, is_oracle\[, is_fraction, unit, decimals\]\)$",
    ):
        render_metric_table(summary, "dice", {"dice": ("Dice",)})


# --- captions and layouts -----------------------------------------------------------------


def test_main_table_with_two_protocols_and_both_directions():
    metrics = ["dice@healthy_fpr_5", "dice@best_dice_val", "hd95@healthy_fpr_5"]
    summary = _summary(
        {
            ("m", "brats", metrics[0]): 0.5,
            ("m", "brats", metrics[1]): 0.6,
            ("m", "brats", metrics[2]): 12.0,
        },
        n_folds=2,
    )
    info = {m: infer_metric_info(m) for m in metrics}
    md = render_main_table(summary, info, main_metrics=metrics)["md"]
    assert md.splitlines()[0] == (
        "**Table: Main results: Dice in %, Dice in %, HD95 in mm; mean ± standard deviation "
        "over 2 folds. Threshold: 5 % FPR on healthy validation (label-free); threshold: best "
        "Dice on the lesion validation split (uses validation pixel labels). Best per column "
        "in bold (higher is better; lower is better).**"
    )
    hd = render_metric_table(summary, metrics[2], info)["md"]
    assert hd.splitlines()[0].endswith("Best per column in bold (lower is better).**")


def test_main_table_orders_and_names_methods_and_datasets():
    summary = _summary(
        {
            ("b", "brats", "dice"): 0.5,
            ("a", "brats", "dice"): 0.25,
            ("b", "atlas", "dice"): 0.125,
        }
    )
    tables = render_main_table(
        summary,
        DICE,
        main_metrics=["dice"],
        method_order=["a"],
        dataset_order=["atlas"],
        method_names={"a": "Method A"},
        dataset_names={"atlas": "ATLAS"},
    )
    lines = tables["md"].splitlines()
    assert lines[2] == "| Method | ATLAS Dice [%] | brats Dice [%] |"
    assert lines[4] == "| Method A | – | 25.0 ± 1.0 |"
    assert lines[5] == "| b | **12.5 ± 1.0** | **50.0 ± 1.0** |"
    tex = tables["tex"].splitlines()
    assert tex[3] == "\\label{tab:main}"
    assert tex[6] == " & \\multicolumn{1}{c}{ATLAS} & \\multicolumn{1}{c}{brats} \\\\"
    assert tex[-5] == "Method A & -- & 25.0 $\\pm$ 1.0 \\\\"
    assert tables["csv"].splitlines()[:2] == [
        "method,dataset,metric,mean,std,n_folds,n_subjects",
        "b,brats,dice,0.5,0.01,3,4",
    ]
    with pytest.raises(InputError, match=r"^render_main_table: main_metrics is empty$"):
        render_main_table(summary, DICE, main_metrics=[])
    metric = render_metric_table(summary, "dice", DICE, method_names={"b": "Method B"})["md"]
    assert "| Method B | **50.0 ± 1.0** | **12.5 ± 1.0** |" in metric


def test_write_tables_passes_order_names_datasets_and_note(tmp_path):
    summary = _summary(
        {
            ("b", "brats", "dice"): 0.5,
            ("a", "brats", "dice"): 0.25,
            ("b", "ixi", "dice"): 0.125,
        }
    )
    write_tables(
        summary,
        tmp_path / "by_metric",
        ["dice"],
        DICE,
        main_metrics=["dice"],
        method_order=["a"],
        dataset_order=["ixi"],
        method_names={"a": "Method A"},
        dataset_names={"brats": "BraTS"},
        main_out_dir=tmp_path / "main",
        main_datasets=["brats"],
        main_note="Prevalence 2 %.",
    )
    metric = (tmp_path / "by_metric" / "dice.md").read_text().splitlines()
    assert metric[2] == "| Method (Dice [%]) | ixi | BraTS |"
    assert metric[4].startswith("| Method A |")
    main = (tmp_path / "main" / "main.md").read_text().splitlines()
    assert main[2] == "| Method | BraTS Dice [%] |"  # the healthy cohort left out
    assert main[4].startswith("| Method A |")
    assert main[-1] == "Prevalence 2 %."
    assert "\\footnotesize Prevalence 2 \\%." in (tmp_path / "main" / "main.tex").read_text()
    with pytest.raises(InputError, match=r"^write_tables: summary: expected exactly one count"):
        write_tables(summary.drop(columns="n_subjects"), tmp_path, ["dice"], DICE)
    with pytest.raises(InputError, match=r"^write_tables: no metrics given$"):
        write_tables(summary, tmp_path, [], DICE)


def test_a_summary_needs_one_count_column_for_its_csv():
    summary = _summary({("a", "d", "dice"): 0.5}).drop(columns="n_subjects")
    with pytest.raises(InputError, match=r"^summary: expected exactly one count column"):
        render_metric_table(summary, "dice", DICE)
