"""Aggregation against its definitions: the pooled precision-recall curve uses exactly the
post-processed scores of the voxels inside each subject's eroded brain mask, prevalence is
pooled (sum of lesion voxels over sum of region voxels, not a mean of ratios), and the
bookkeeping columns never get a table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.evaluation import aggregate
from brainuad.evaluation.aggregate import (
    build_tables,
    largest_lesion_slices,
    lesion_prevalence,
    pooled_pr_curve,
    prevalence_note,
    slice_level_fold_values,
    tabulated_metrics,
)
from brainuad.evaluation.grid import EvaluationConfig
from brainuad.evaluation.postprocess import PostprocessConfig, erode_brainmask, postprocess_map
from brainuad.evaluation.tables import collect_metrics
from brainuad.io.scores import ScoresWriter
from brainuad.slices.hdf5 import SliceFile, SliceWriter

H = W = 16


@pytest.fixture
def cohort(tmp_path):
    """Three subjects of 5 slices with irregular brains, random maps; s2 has no lesion."""
    rng = np.random.default_rng(0)
    slice_path = tmp_path / "cohort.h5"
    volumes = {}
    with SliceWriter(slice_path, sequences=["t2"], height=H, width=W) as writer:
        for subject in ("s0", "s1", "s2"):
            brain = np.zeros((5, H, W), np.uint8)
            brain[:, 2:14, 3:13] = 1
            brain[:, 2:6, 3:7] = 0  # not a box
            seg = np.zeros_like(brain)
            if subject != "s2":
                seg[1:4, 7:11, 6:10] = 1
            images = (brain[:, None] * 0.5).astype(np.float32)
            writer.append_subject(subject, images, brain, seg, np.arange(5))
            amap = (rng.random((5, H, W)) + seg).astype(np.float32)
            volumes[subject] = (brain, seg, amap)
    slices = SliceFile(slice_path)
    paths = {}
    for name, subjects in (("all", ["s0", "s1", "s2"]), ("healthy", ["s2"])):
        rows = slices.rows_for_subjects(subjects)
        amaps = np.concatenate([volumes[s][2] for s in subjects])
        paths[name] = tmp_path / f"{name}.h5"
        attrs = {"method": "m", "fold": 0, "dataset": "toy", "split": "test"}
        with ScoresWriter(
            paths[name], rows=rows[::-1], height=H, width=W, channels=None, attrs=attrs
        ) as writer:
            writer.write(amaps[::-1])
    slices.close()
    return slice_path, paths, volumes


def test_pooled_pr_curve_uses_postprocessed_scores_inside_the_eroded_mask(cohort, monkeypatch):
    slice_path, paths, volumes = cohort
    cfg = PostprocessConfig(erode_iterations=1, median_kernel=3, min_component_voxels=0)
    seen = {}

    def capture(scores, labels):
        seen["scores"], seen["labels"] = np.asarray(scores), np.asarray(labels)
        return np.array([1.0]), np.array([1.0])

    monkeypatch.setattr(aggregate, "pr_curve_from_arrays", capture)
    assert pooled_pr_curve(slice_path, paths["all"], cfg) is not None
    expected_scores, expected_labels = [], []
    for brain, seg, amap in volumes.values():
        region = erode_brainmask(brain, cfg)
        expected_scores.append(postprocess_map(amap, brain, cfg)[region])
        expected_labels.append(seg[region])
    expected = np.stack([np.concatenate(expected_scores), np.concatenate(expected_labels)])
    got = np.stack([seen["scores"].astype(np.float64), seen["labels"].astype(np.float64)])
    # the same voxels (as (score, label) pairs; the order of subjects is free)
    order_e = np.lexsort(expected[::-1])
    order_g = np.lexsort(got[::-1])
    np.testing.assert_allclose(got[:, order_g], expected[:, order_e], rtol=1e-6)


def test_pooled_pr_curve_is_none_without_lesion_voxels(cohort):
    slice_path, paths, _ = cohort
    assert pooled_pr_curve(slice_path, paths["healthy"], PostprocessConfig()) is None
    precision, recall = pooled_pr_curve(slice_path, paths["all"], PostprocessConfig())
    assert recall[0] == 1.0 and recall[-1] == 0.0 and precision.shape == recall.shape


def _metrics(path, lesion, region):
    pd.DataFrame(
        {
            "subject": [f"x{i}" for i in range(len(lesion))],
            "has_lesion": [v > 0 for v in lesion],
            "dice@healthy_fpr_5": [0.5] * len(lesion),
            "true_volume_voxels": lesion,
            "region_voxels": region,
        }
    ).to_csv(path, index=False)
    return path


def test_prevalence_is_pooled_over_subjects_and_folds(tmp_path):
    paths = {
        ("a", 0, "brats"): _metrics(tmp_path / "a0.csv", [30, 0], [1000, 500]),
        ("a", 1, "brats"): _metrics(tmp_path / "a1.csv", [10], [500]),
        ("b", 0, "brats"): _metrics(tmp_path / "b0.csv", [30, 0], [800, 200]),
        ("b", 1, "brats"): _metrics(tmp_path / "b1.csv", [10], [1000]),
    }
    prevalence = lesion_prevalence(collect_metrics(paths))
    assert list(prevalence.columns) == ["dataset", "method", "lesion_prevalence"]
    values = prevalence.set_index("method")["lesion_prevalence"]
    assert values["a"] == pytest.approx(40 / 2000)  # not mean(0.03, 0, 0.02)
    assert values["b"] == pytest.approx(40 / 2000)
    note = prevalence_note(prevalence, ["brats"], ["b", "a"])
    assert note == (
        "Lesion prevalence (lesion fraction of the evaluated voxels of the test "
        "subjects, the AUPRC of a random score): brats 2.00 %."
    )
    paths[("b", 1, "brats")] = _metrics(tmp_path / "b1.csv", [10], [3000])
    prevalence = lesion_prevalence(collect_metrics(paths))
    note = prevalence_note(prevalence, ["brats", "ixi"], ["b", "a"])
    assert note.endswith("brats 1.00 % (b), 2.00 % (a).")
    assert prevalence_note(prevalence, ["ixi"], ["a"]) is None
    # without the count columns: no prevalence at all
    only_dice = {
        ("a", 0, "brats"): tmp_path / "d.csv",
    }
    pd.DataFrame({"subject": ["x"], "has_lesion": [True], "dice@healthy_fpr_5": [0.1]}).to_csv(
        only_dice[("a", 0, "brats")], index=False
    )
    empty = lesion_prevalence(collect_metrics(only_dice))
    assert empty.empty and list(empty.columns) == ["dataset", "method", "lesion_prevalence"]


def test_tabulated_metrics_skip_bookkeeping_and_refuse_unknown():
    columns = [
        "dice@healthy_fpr_5",
        "n_slices",
        "has_lesion",
        "region_voxels",
        "true_volume_voxels",
        "oracle_threshold",
        "pred_volume_voxels@healthy_fpr_5",
        "auprc",
    ]
    assert tabulated_metrics(columns) == ["dice@healthy_fpr_5", "auprc"]
    with pytest.raises(InputError, match="unknown base name 'dcie'"):
        tabulated_metrics(["auprc", "dcie@healthy_fpr_5"])


def test_slice_level_fold_values(tmp_path):
    summaries = {}
    for fold, level in enumerate(
        ({"slice_auroc": 0.8, "slice_auprc": None, "n_slices": 40}, {"slice_auroc": 0.6})
    ):
        summaries[("m", fold, "brats")] = tmp_path / f"s{fold}.json"
        summaries[("m", fold, "brats")].write_text(json.dumps({"slice_level": level}))
    table = slice_level_fold_values(summaries)
    assert list(table.columns) == ["method", "dataset", "fold", "metric", "mean", "n"]
    rows = {(r.fold, r.metric): (r.mean, r.n) for r in table.itertuples()}
    assert rows[(0, "slice_auroc")] == (0.8, 40)
    assert np.isnan(rows[(0, "slice_auprc")][0]) and rows[(0, "slice_auprc")][1] == 40
    assert rows[(1, "slice_auroc")] == (0.6, 0)
    assert np.isnan(rows[(1, "slice_auprc")][0])
    assert set(table["method"]) == {"m"} and set(table["dataset"]) == {"brats"}


def test_threshold_for_a_missing_protocol_is_an_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"thresholds": {"healthy_fpr_5": {"threshold": 0.25}}}))
    assert aggregate._threshold(path, "brats", "healthy_fpr_5") == 0.25
    with pytest.raises(InputError, match=r"t.json: no threshold for protocol 'healthy_fpr_1'"):
        aggregate._threshold(path, "brats", "healthy_fpr_1")


def test_build_figures_draws_fold_0_of_the_lesion_cohorts(cohort, tmp_path, monkeypatch):
    """Box plots: every fold, lesion cohorts only; PR curves and examples (two per dataset by
    default): fold 0 by default, in the evaluation mode given; training curves: every log;
    each figure to its own outputs, methods in study order."""
    slice_path, paths, _ = cohort
    drawn, modes = {}, []
    for name in (
        "plot_subject_dice_boxplots",
        "plot_precision_recall",
        "plot_qualitative_grid",
        "plot_training_curves",
    ):
        monkeypatch.setattr(
            aggregate, name, lambda *a, _name=name, **k: drawn.__setitem__(_name, (a, k))
        )
    real_curve = aggregate.pooled_pr_curve

    def curve(slice_file, scores, cfg, evaluation=None):
        modes.append(evaluation)
        return real_curve(slice_file, scores, cfg, evaluation)

    monkeypatch.setattr(aggregate, "pooled_pr_curve", curve)
    lesion_datasets = ["toy", "toy2"]  # two cohorts on the same slice file
    metric_paths, logs = {}, {}
    for method in ("n", "m"):
        for fold in (0, 1):
            for dataset, dice in (("toy", 0.5), ("toy2", 0.25 + fold / 10), ("ixi", np.nan)):
                path = tmp_path / f"{method}{fold}{dataset}.csv"
                pd.DataFrame(
                    {"subject": ["s0"], "has_lesion": [dataset != "ixi"], "dice@p": [dice]}
                ).to_csv(path, index=False)
                metric_paths[(method, fold, dataset)] = path
            logs[(method, fold)] = tmp_path / f"{method}{fold}.log.csv"
            pd.DataFrame({"step": [1, 2], "train_loss": [1.0, 0.5 + fold]}).to_csv(
                logs[(method, fold)], index=False
            )
    threshold = tmp_path / "threshold.json"
    threshold.write_text(json.dumps({"thresholds": {"p": {"threshold": 0.9}}}))
    # fold 0 scored every subject, fold 1 the healthy subject only (no PR curve, no example)
    test_scores = {
        (m, f, d): paths["all" if f == 0 else "healthy"]
        for m in ("n", "m")
        for f in (0, 1)
        for d in lesion_datasets
    }
    outputs = {
        name: (tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
        for name in ("dice_boxplot", "pr_curves", "qualitative", "training_curves")
    }
    cfg = PostprocessConfig(erode_iterations=1, median_kernel=3, min_component_voxels=0)
    mode = EvaluationConfig()
    aggregate.build_figures(
        metric_paths=metric_paths,
        train_logs=logs,
        test_scores=test_scores,
        slices=dict.fromkeys(lesion_datasets, slice_path),
        thresholds={(m, f): threshold for m in ("n", "m") for f in (0, 1)},
        outputs=outputs,
        lesion_datasets=lesion_datasets,
        methods=["n", "m"],
        default_protocol="p",
        postprocess={"n": cfg, "m": cfg},
        evaluation=mode,
    )
    (long, metric, *files), kwargs = drawn["plot_subject_dice_boxplots"]
    assert metric == "dice@p" and files == list(outputs["dice_boxplot"])
    assert set(long["dataset"]) == {"toy", "toy2"} and sorted(set(long["fold"])) == [0, 1]
    assert kwargs == {
        "ylabel": "Dice (p)",
        "method_order": ["n", "m"],
        "dataset_order": lesion_datasets,
    }

    (curves, *files), kwargs = drawn["plot_precision_recall"]
    assert files == list(outputs["pr_curves"])
    assert list(curves) == [("n", "toy"), ("m", "toy"), ("n", "toy2"), ("m", "toy2")]
    assert len(modes) == 4 and all(m is mode for m in modes)
    want = real_curve(slice_path, paths["all"], cfg)
    for pr in curves.values():
        for got, expected in zip(pr, want, strict=True):
            np.testing.assert_array_equal(got, expected)
    assert kwargs == {"method_order": ["n", "m"], "dataset_order": lesion_datasets}

    (examples, *files), kwargs = drawn["plot_qualitative_grid"]
    assert files == list(outputs["qualitative"]) and not kwargs
    assert [(e["dataset"], e["method"]) for e in examples] == [
        (d, m) for d in lesion_datasets for m in ("n", "m") for _ in range(2)
    ]
    assert all(e["ground_truth"].sum() == 16 for e in examples)  # slices of the lesion

    (read_logs, *files), kwargs = drawn["plot_training_curves"]
    assert files == list(outputs["training_curves"]) and kwargs == {"method_order": ["n", "m"]}
    assert list(read_logs) == list(logs)
    assert read_logs[("m", 1)]["train_loss"].tolist() == [1.0, 1.5]


def _metrics_file(path, rows):
    """Per-subject metrics: rows of (dice, lesion voxels, region voxels)."""
    pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(len(rows))],
            "has_lesion": [lesion > 0 for _, lesion, _ in rows],
            "dice@p": [dice for dice, _, _ in rows],
            "true_volume_voxels": [lesion for _, lesion, _ in rows],
            "region_voxels": [region for _, _, region in rows],
        }
    ).to_csv(path, index=False)
    return path


def test_build_tables_orders_names_and_notes_every_table(tmp_path):
    """Methods and datasets in study order in every table (not file order); the main table
    and the slice-level tables show the lesion cohorts only; both notes under the main table;
    every file written is returned; a rerun into the same folders works."""
    metric_paths, summary_paths = {}, {}
    # method a's evaluated region is larger than b's: prevalences 2.00 % and 2.50 %
    for method, region in (("a", 1000), ("b", 800)):
        for dataset, rows in (
            ("ixi", [(math.nan, 0, region)]),
            ("atlas", [(0.25, 20, region)]),
            ("brats", [(0.5 if method == "a" else 0.75, 20, region)]),
        ):
            key = (method, 0, dataset)
            metric_paths[key] = _metrics_file(tmp_path / f"{method}_{dataset}.csv", rows)
            summary_paths[key] = tmp_path / f"{method}_{dataset}.json"
            summary_paths[key].write_text(
                json.dumps(
                    {"slice_level": {"slice_auroc": 0.75, "slice_auprc": 0.5, "n_slices": 9}}
                )
            )
    kwargs = {
        "metric_paths": metric_paths,
        "by_metric_dir": tmp_path / "by_metric",
        "main_dir": tmp_path / "main",
        "default_protocol": "p",
        "method_order": ["b", "a"],
        "dataset_order": ["brats", "atlas", "ixi"],
        "lesion_datasets": ["brats", "atlas"],
        "prevalence_path": tmp_path / "prevalence.csv",
        "summary_paths": summary_paths,
    }
    (tmp_path / "main").mkdir()
    _, paths = build_tables(**kwargs)
    by_metric = tmp_path / "by_metric"
    assert sorted(str(p.relative_to(tmp_path)) for p in paths) == sorted(
        [
            f"by_metric/{stem}.{ext}"
            for stem in ("dice_at_p", "slice_auroc", "slice_auprc")
            for ext in ("csv", "md", "tex")
        ]
        + [f"main/main.{ext}" for ext in ("csv", "md", "tex")]
        + ["prevalence.csv"]
    )
    dice = (by_metric / "dice_at_p.md").read_text().splitlines()
    assert dice[2] == "| Method (Dice [%]) | brats | atlas | ixi |"
    assert [line.split("|")[1].strip() for line in dice[4:]] == ["b", "a"]
    for name in ("slice_auroc", "slice_auprc"):
        table = (by_metric / f"{name}.md").read_text().splitlines()
        assert table[2].endswith("| brats | atlas |")  # no healthy cohort
        assert [line.split("|")[1].strip() for line in table[4:]] == ["b", "a"]
    main = (tmp_path / "main" / "main.md").read_text().splitlines()
    assert main[2] == "| Method | brats Dice [%] (p) | atlas Dice [%] (p) |"
    assert [line.split("|")[1].strip() for line in main[4:6]] == ["b", "a"]
    assert main[-1] == (
        "Evaluation: eroded brain mask of the slice file's slices. Lesion prevalence (lesion "
        "fraction of the evaluated voxels of the test subjects, the AUPRC of a random score): "
        "brats 2.50 % (b), 2.00 % (a); atlas 2.50 % (b), 2.00 % (a)."
    )
    prevalence = pd.read_csv(tmp_path / "prevalence.csv")
    assert prevalence.columns.tolist() == ["dataset", "method", "lesion_prevalence"]
    # in order of first appearance in the metric files
    assert list(zip(prevalence["dataset"], prevalence["method"], strict=True)) == [
        (d, m) for d in ("ixi", "atlas", "brats") for m in ("a", "b")
    ]
    note = prevalence_note(lesion_prevalence(collect_metrics(metric_paths)), ["x", "brats"], [])
    assert note.endswith("score): brats 2.00 % (a), 2.50 % (b).")
    assert build_tables(**kwargs)[1] == paths  # into the folders of the first run


def test_summaries_without_an_evaluation_record_are_brain_mask_mode(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"slice_level": {}}))
    new.write_text(json.dumps({"slice_level": {}, "evaluation": {"mode": "brain_mask"}}))
    note = aggregate.evaluation_note({("a", 0, "d"): old, ("b", 0, "d"): new})
    assert note == "Evaluation: eroded brain mask of the slice file's slices."
    assert aggregate.evaluation_note({}) is None
    # the grid's spacing and the absent slices do not make another mode
    grid = {"mode": "reference", "extent_mm": 100, "slice_spacing_mm": 2, "n_slices": 50}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"evaluation": {**grid, "spacing_mm": [1, 1], "absent_slices": 2}}))
    two.write_text(json.dumps({"evaluation": {**grid, "spacing_mm": [2, 2], "absent_slices": 0}}))
    assert aggregate.evaluation_note({1: one, 2: two}).startswith("Evaluation: reference grid")
    modes = {}
    for extent in (60, 80, 100, 120):
        modes[extent] = tmp_path / f"grid{extent}.json"
        modes[extent].write_text(json.dumps({"evaluation": {**grid, "extent_mm": extent}}))
    with pytest.raises(InputError) as error:
        aggregate.evaluation_note(modes)
    listed = [str(modes[e]) for e in (60, 80, 100)]
    assert str(error.value) == (
        f"metrics summaries {listed} were made in different evaluation modes; rerun the "
        "metrics of one study config"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for read in (aggregate.evaluation_note, slice_level_fold_values):
        with pytest.raises(
            InputError, match=r"broken\.json: not a readable metrics summary \(JSON\) "
        ):
            read({("a", 0, "d"): broken})


def test_thresholds_of_qualitative_examples_are_the_datasets_own(cohort, tmp_path):
    """A best-Dice threshold applies to the dataset it was chosen on only."""
    _, _, _ = cohort
    path = tmp_path / "threshold.json"
    entries = {"best_dice_val/toy": {"threshold": 0.25}, "best_dice_val/other": {"threshold": 9}}
    path.write_text(json.dumps({"thresholds": entries}))
    assert aggregate._threshold(path, "toy", "best_dice_val") == 0.25
    assert aggregate._threshold(path, "other", "best_dice_val") == 9.0
    with pytest.raises(InputError, match=r"threshold file"):
        aggregate._threshold(tmp_path / "missing.json", "toy", "best_dice_val")


def test_pooled_pr_curve_of_a_split_without_subjects_is_none(cohort, monkeypatch):
    slice_path, paths, _ = cohort
    monkeypatch.setattr(aggregate, "iter_subject_volumes", lambda *a, **k: iter(()))
    assert pooled_pr_curve(slice_path, paths["all"], PostprocessConfig()) is None


@pytest.fixture
def reconstructed(tmp_path):
    """Four subjects of 3 slices; s2 has the largest lesion slice (area 9) but only method m2
    scored it; every map comes with a reconstruction."""
    slice_path = tmp_path / "rec.h5"
    areas = {"s0": [0, 4, 0], "s1": [1, 0, 0], "s2": [0, 0, 9], "s3": [0, 0, 0]}
    with SliceWriter(slice_path, sequences=["t2"], height=H, width=W) as writer:
        for subject, per_slice in areas.items():
            brain = np.zeros((3, H, W), np.uint8)
            brain[:, 2:14, 2:14] = 1
            seg = np.zeros_like(brain)
            for s, area in enumerate(per_slice):
                side = int(np.sqrt(area))
                seg[s, 4 : 4 + side, 4 : 4 + side] = 1
            images = np.full((3, 1, H, W), 0.5, np.float32)
            writer.append_subject(subject, images, brain, seg, np.arange(3))
    slices = SliceFile(slice_path)
    data = slices.read(np.arange(12))
    scores = {}
    for method, subjects in (
        ("m1", ["s0", "s1", "s3"]),
        ("m2", ["s0", "s1", "s2", "s3"]),
        ("single", ["s1", "s3"]),
    ):
        rows = slices.rows_for_subjects(subjects)
        amap = data["seg"][rows].astype(np.float32)
        reconstruction = np.full((rows.size, 1, H, W), 0.25, np.float32)
        scores[method] = tmp_path / f"{method}.h5"
        attrs = {"method": method, "fold": 0, "dataset": "toy", "split": "test"}
        with ScoresWriter(
            scores[method], rows=rows, height=H, width=W, channels=1, attrs=attrs
        ) as writer:
            writer.write(amap, reconstruction)
    slices.close()
    return slice_path, scores


def test_qualitative_examples_follow_the_first_method_and_show_reconstructions(
    reconstructed, tmp_path
):
    slice_path, scores = reconstructed
    assert largest_lesion_slices(slice_path, scores["m1"], 5) == [("s0", 1), ("s1", 0)]
    threshold = tmp_path / "threshold.json"
    threshold.write_text(
        json.dumps(
            {
                "thresholds": {
                    "best_dice_val/toy": {"threshold": 0.5},
                    "best_dice_val/x": {"threshold": 2},
                }
            }
        )
    )
    cfg = PostprocessConfig(erode_iterations=0, median_kernel=1, min_component_voxels=0)
    examples = aggregate.qualitative_examples(
        dataset="toy",
        methods=["m1", "m2"],
        slice_path=slice_path,
        scores_paths=scores,
        threshold_paths={"m1": threshold, "m2": threshold},
        protocol="best_dice_val",
        postprocess={"m1": cfg, "m2": cfg},
        n_examples=1,
    )
    # chosen on m1's rows: s0's slice 1 (area 4), not m2's s2 (area 9)
    assert [(e["method"], int(e["ground_truth"].sum())) for e in examples] == [
        ("m1", 4),
        ("m2", 4),
    ]
    brain = np.zeros((H, W), np.float32)
    brain[2:14, 2:14] = 1
    for example in examples:
        assert set(example) == {
            "dataset",
            "method",
            "input",
            "reconstruction",
            "anomaly_map",
            "thresholded",
            "ground_truth",
        }
        np.testing.assert_array_equal(example["input"], np.full((H, W), 0.5, np.float32))
        np.testing.assert_array_equal(example["reconstruction"], 0.25 * brain)
        np.testing.assert_array_equal(example["thresholded"], example["ground_truth"])


def test_largest_lesion_slices_of_a_single_lesion_slice(reconstructed):
    slice_path, scores = reconstructed
    assert largest_lesion_slices(slice_path, scores["single"], 3) == [("s1", 0)]
