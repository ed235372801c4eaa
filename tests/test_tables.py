"""Tests of brainuad.evaluation.tables: fold aggregation and the rendered tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.metrics import subject_volume_metrics
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.evaluation.tables import (
    MetricInfo,
    collect_metrics,
    display_order,
    fold_means,
    infer_metric_info,
    latex_escape,
    main_table_markdown,
    render_main_table,
    render_metric_table,
    summarise_over_folds,
    table_stem,
    write_tables,
)

NAN = math.nan


def _write_csv(path, dice, auprc, fpr=None, has_lesion=None):
    has_lesion = has_lesion or [not math.isnan(d) for d in dice]
    frame = pd.DataFrame(
        {
            "subject": [f"sub-{i}" for i in range(len(dice))],
            "has_lesion": has_lesion,
            "dice@healthy_fpr_5": dice,
            "auprc": auprc,
            "fpr@healthy_fpr_5": fpr or [0.01] * len(dice),
        }
    )
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def metric_paths(tmp_path):
    """Two methods × two folds × one dataset; the last subject has no lesion, so, as the
    metrics module writes it, NaN Dice and AUPRC but an FPR."""
    values = {
        ("good", 0): ([0.6, 0.8, NAN], [0.5, 0.7, NAN], [0.01, 0.02, 0.06]),
        ("good", 1): ([0.7, 0.9, NAN], [0.6, 0.8, NAN], [0.01, 0.01, 0.04]),
        ("bad", 0): ([0.1, 0.3, NAN], [0.2, 0.4, NAN], [0.03, 0.05, 0.07]),
        ("bad", 1): ([0.2, 0.2, NAN], [0.2, 0.2, NAN], [0.02, 0.02, 0.08]),
    }
    return {
        (method, fold, "brats"): _write_csv(tmp_path / f"{method}{fold}.csv", *columns)
        for (method, fold), columns in values.items()
    }


@pytest.fixture
def summary(metric_paths):
    return summarise_over_folds(fold_means(collect_metrics(metric_paths)))


INFO = {
    "dice@healthy_fpr_5": MetricInfo(
        "Dice", True, "threshold: 5 % FPR on healthy validation", False
    ),
    "auprc": ("AUPRC", True, None, False),  # plain tuples are accepted too
}


def _row(frame, **keys):
    mask = np.logical_and.reduce([frame[k] == v for k, v in keys.items()])
    (index,) = np.flatnonzero(mask)
    return frame.iloc[index]


def test_collect_metrics_is_long(metric_paths):
    long = collect_metrics(metric_paths)
    assert list(long.columns) == [
        "method",
        "fold",
        "dataset",
        "subject",
        "has_lesion",
        "metric",
        "value",
    ]
    assert len(long) == 4 * 3 * 3
    assert long["fold"].dtype.kind == "i"


def test_collect_metrics_names_the_file_with_a_missing_column(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["a"], "has_lesion": [True], "auprc": [0.5]}).to_csv(path)
    with pytest.raises(InputError, match=r"m\.csv.*dice"):
        collect_metrics({("x", 0, "d"): path}, metrics=["dice"])
    with pytest.raises(InputError, match="empty"):
        collect_metrics({})


def test_fold_means_ignore_nan_and_count_subjects(metric_paths):
    folds = fold_means(collect_metrics(metric_paths))
    dice = _row(folds, method="good", fold=0, metric="dice@healthy_fpr_5")
    assert dice["mean"] == pytest.approx(0.7)  # healthy NaN left out, not counted as 0
    assert dice["n"] == 2
    auprc = _row(folds, method="good", fold=0, metric="auprc")
    assert auprc["mean"] == pytest.approx((0.5 + 0.7) / 2)
    assert auprc["n"] == 2
    fpr = _row(folds, method="good", fold=0, metric="fpr@healthy_fpr_5")
    assert fpr["mean"] == pytest.approx((0.01 + 0.02 + 0.06) / 3)  # every subject counts
    assert fpr["n"] == 3


def test_fold_means_of_lesion_metrics_cover_lesion_subjects_only(tmp_path):
    """Through the real metrics: a lesion-free subject with a false positive adds nothing to
    Dice or lesion precision (not a 0), but counts in FPR and false-positive lesions."""
    region = np.zeros((4, 12, 12), bool)
    region[:, 1:11, 1:11] = True
    lesion = np.zeros_like(region)
    lesion[1:3, 2:6, 2:6] = True
    with_lesion = lesion.astype(np.float32)
    with_lesion[1, 8, 8] = 1.0  # plus one false-positive voxel
    false_positive = np.zeros(region.shape, np.float32)
    false_positive[1:3, 7:9, 7:9] = 1.0
    no_cc = PostprocessConfig(min_component_voxels=0)
    rows = [
        {
            "subject": "sick",
            **subject_volume_metrics(with_lesion, region, lesion, {"p": 0.5}, no_cc),
        },
        {
            "subject": "well",
            **subject_volume_metrics(
                false_positive, region, np.zeros_like(region), {"p": 0.5}, no_cc
            ),
        },
    ]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    metrics = ["dice@p", "lesion_precision@p", "fpr@p", "lesion_fp@p"]
    long = collect_metrics({("m", 0, "d"): path}, metrics=metrics)
    well = long[long["subject"] == "well"].set_index("metric")["value"]
    assert math.isnan(well["dice@p"]) and math.isnan(well["lesion_precision@p"])
    assert well["lesion_fp@p"] == 1 and well["fpr@p"] == pytest.approx(8 / region.sum())
    means = fold_means(long).set_index("metric")
    assert means.at["dice@p", "n"] == 1
    assert means.at["dice@p", "mean"] == pytest.approx(2 * 32 / (33 + 32))
    assert means.at["lesion_precision@p", "n"] == 1
    assert means.at["lesion_precision@p", "mean"] == pytest.approx(0.5)
    assert means.at["fpr@p", "n"] == 2 and means.at["lesion_fp@p", "n"] == 2
    assert means.at["lesion_fp@p", "mean"] == pytest.approx(1.0)


def test_summary_matches_hand_computation(summary):
    row = _row(summary, method="good", metric="dice@healthy_fpr_5")
    fold_values = [0.7, 0.8]  # fold means computed by hand
    assert row["mean"] == pytest.approx(np.mean(fold_values))
    assert row["std"] == pytest.approx(np.std(fold_values, ddof=1))
    assert row["n_folds"] == 2
    assert row["n_subjects"] == 2


def test_summary_std_is_nan_for_one_fold(metric_paths):
    one_fold = {key: path for key, path in metric_paths.items() if key[1] == 0}
    summary = summarise_over_folds(fold_means(collect_metrics(one_fold)))
    assert summary["std"].isna().all()
    assert (summary["n_folds"] == 1).all()


def test_all_nan_group_is_kept_as_nan(tmp_path):
    path = _write_csv(tmp_path / "h.csv", [NAN, NAN], [NAN, NAN], has_lesion=[False, False])
    summary = summarise_over_folds(fold_means(collect_metrics({("m", 0, "d"): path})))
    dice = _row(summary, metric="dice@healthy_fpr_5")
    assert math.isnan(dice["mean"])
    assert dice["n_folds"] == 0


def _bold_rows(markdown: str) -> list[str]:
    table = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [line.split("|")[1].strip() for line in table if "**" in line]


@pytest.mark.parametrize(("higher_is_better", "best"), [(True, "good"), (False, "bad")])
def test_bold_marks_best_per_column(summary, higher_is_better, best):
    info = {"dice@healthy_fpr_5": MetricInfo("Dice", higher_is_better, None, False)}
    tables = render_metric_table(summary, "dice@healthy_fpr_5", info)
    assert _bold_rows(tables["md"]) == [best]
    bold_tex = [line for line in tables["tex"].splitlines() if r"\textbf" in line]
    assert len(bold_tex) == 1
    assert bold_tex[0].startswith(best)


def test_no_bold_when_direction_is_undefined(summary):
    info = {"auprc": MetricInfo("AUPRC", None, None, False)}
    tables = render_metric_table(summary, "auprc", info)
    assert _bold_rows(tables["md"]) == []
    assert r"\textbf" not in tables["tex"]


def test_values_shown_in_percent_with_std(summary):
    markdown = render_metric_table(summary, "dice@healthy_fpr_5", INFO)["md"]
    assert "**75.0 ± 7.1**" in markdown  # mean 0.75, std 0.0707 over folds


def test_latex_has_booktabs_and_escapes(summary):
    renamed = summary.assign(method=summary["method"].str.replace("good", "ano_ddpm"))
    tex = render_metric_table(renamed, "dice@healthy_fpr_5", INFO)["tex"]
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"ano\_ddpm" in tex
    assert "ano_ddpm" not in tex
    assert r"5 \% FPR on healthy validation" in tex  # protocol named in the caption
    assert r"$\pm$" in tex


def test_latex_escape():
    assert latex_escape("a_b & 5% #1 {x}") == r"a\_b \& 5\% \#1 \{x\}"


def test_oracle_is_labelled(summary):
    info = {"dice@healthy_fpr_5": MetricInfo("Dice", True, None, True)}
    tables = render_metric_table(summary, "dice@healthy_fpr_5", info)
    assert "(oracle)" in tables["md"].splitlines()[0]  # caption
    assert "Dice (oracle)" in tables["md"]  # header
    assert "(oracle)" in tables["tex"]


def _assert_well_formed_markdown(markdown: str) -> None:
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) >= 3
    pipes = {line.replace("\\|", "").count("|") for line in table}
    assert len(pipes) == 1
    assert set(table[1].replace("|", "").split()) <= {"---", ":---:"}


def test_write_tables_files_and_markdown(summary, tmp_path):
    metrics = ["dice@healthy_fpr_5", "auprc"]
    written = write_tables(summary, tmp_path / "tables", metrics, INFO)
    names = sorted(path.name for path in written)
    assert names == sorted(
        f"{stem}.{suffix}"
        for stem in ("dice_at_healthy_fpr_5", "auprc", "main")
        for suffix in ("csv", "md", "tex")
    )
    for path in written:
        assert path.stat().st_size > 0
        if path.suffix == ".md":
            _assert_well_formed_markdown(path.read_text())
    assert not list((tmp_path / "tables").glob(".*"))  # no temporary files left


def test_csv_round_trips(summary, tmp_path):
    write_tables(summary, tmp_path, ["dice@healthy_fpr_5", "auprc"], INFO)
    back = pd.read_csv(tmp_path / "dice_at_healthy_fpr_5.csv")
    expected = summary[summary["metric"] == "dice@healthy_fpr_5"].reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)


def test_main_table_layout(summary):
    markdown = main_table_markdown(summary, INFO)
    _assert_well_formed_markdown(markdown)
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "Method",
        "brats Dice [%]",
        "brats AUPRC [%]",
    ]
    with pytest.raises(InputError, match="hd95"):
        main_table_markdown(summary, INFO, main_metrics=["hd95"])


def test_missing_method_dataset_cell_is_a_dash(summary):
    extra = pd.DataFrame(
        [
            {
                "method": "good",
                "dataset": "atlas",
                "metric": "auprc",
                "mean": 0.5,
                "std": NAN,
                "n_folds": 1,
                "n_subjects": 3,
            }
        ]
    )
    markdown = render_metric_table(pd.concat([summary, extra]), "auprc", INFO)["md"]
    _assert_well_formed_markdown(markdown)
    bad_row = next(line for line in markdown.splitlines() if line.startswith("| bad"))
    assert bad_row.rstrip(" |").endswith("–")


def test_infer_metric_info():
    info = infer_metric_info("dice@healthy_fpr_5")
    assert info.protocol == "threshold: 5 % FPR on healthy validation (label-free)"
    assert info.protocol_label == "5 % healthy FPR, label-free"
    best = infer_metric_info("dice@best_dice_val")
    assert "uses validation pixel labels" in best.protocol
    half = infer_metric_info("dice@healthy_fpr_0p5")
    assert half.protocol_label == "0.5 % healthy FPR, label-free"
    assert info.higher_is_better and not info.is_oracle and info.is_fraction
    assert infer_metric_info("oracle_dice").is_oracle
    assert infer_metric_info("hd95@healthy_fpr_1").higher_is_better is False
    with pytest.raises(InputError, match="unknown"):
        infer_metric_info("mystery@x")
    assert table_stem("dice@healthy_fpr_5") == "dice_at_healthy_fpr_5"


def test_main_table_can_go_to_its_own_folder(summary, tmp_path):
    written = write_tables(summary, tmp_path / "by_metric", ["auprc"], INFO, main_out_dir=tmp_path)
    assert (tmp_path / "main.md").exists()
    assert (tmp_path / "by_metric" / "auprc.tex").exists()
    assert not (tmp_path / "by_metric" / "main.md").exists()
    assert len(written) == 6


def test_collect_metrics_rejects_text_in_a_metric_column(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"subject": ["a"], "has_lesion": [True], "auprc": ["high"]}).to_csv(path)
    with pytest.raises(InputError, match=r"t\.csv.*auprc.*not numeric"):
        collect_metrics({("x", 0, "d"): path}, metrics=["auprc"])


def test_main_table_note_under_the_table(summary):
    note = "Lesion prevalence: brats 1.00 %."
    tables = render_main_table(summary, INFO, note=note)
    lines = tables["md"].rstrip("\n").splitlines()
    assert lines[-1] == note and tables["md"].count(note) == 1
    # under the table, after the blank line that ends a Markdown table
    assert lines[-2] == "" and lines[-3].startswith("|")
    tex = tables["tex"]
    assert r"{\footnotesize Lesion prevalence: brats 1.00 \%.}" in tex
    assert tex.index(r"\end{tabular}") < tex.index("footnotesize") < tex.index(r"\end{table}")
    assert note not in tables["csv"]
    for empty in (None, ""):
        plain = render_main_table(summary, INFO, note=empty)
        assert plain["md"] == main_table_markdown(summary, INFO)
        assert "footnotesize" not in plain["tex"]


def test_slice_counts_are_named_n_slices(tmp_path):
    fold_df = pd.DataFrame(
        {
            "method": ["m", "m"],
            "dataset": ["d", "d"],
            "fold": [0, 1],
            "metric": ["auprc", "auprc"],
            "mean": [0.4, 0.6],
            "n": [120, 118],
        }
    )
    summary = summarise_over_folds(fold_df, count_name="n_slices")
    assert "n_subjects" not in summary.columns and summary.at[0, "n_slices"] == 118
    write_tables(summary, tmp_path, ["auprc"], INFO, main_metrics=None)
    assert list(pd.read_csv(tmp_path / "auprc.csv").columns)[-1] == "n_slices"
    with pytest.raises(ValueError, match="count_name"):
        summarise_over_folds(fold_df, count_name="n")
    with pytest.raises(InputError, match="count column"):
        write_tables(summary.drop(columns="n_slices"), tmp_path, ["auprc"], INFO)


def test_display_order():
    assert display_order(pd.Series(["b", "a", "b", "c"]), None) == ["b", "a", "c"]
    assert display_order(["b", "a", "c"], ["c", "x", "a"]) == ["c", "a", "b"]
