"""Tests of brainuad.evaluation.aggregate: prevalence note, table files, qualitative examples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.evaluation import aggregate
from brainuad.evaluation.aggregate import (
    build_tables,
    largest_lesion_slices,
    lesion_prevalence,
    prevalence_note,
    qualitative_examples,
)
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.evaluation.tables import collect_metrics
from brainuad.io.scores import ScoresWriter
from brainuad.slices.hdf5 import SliceFile, SliceWriter

H = W = 16


def _metrics_csv(path, lesion_voxels, region_voxels, dice):
    pd.DataFrame(
        {
            "subject": [f"sub-{i}" for i in range(len(dice))],
            "has_lesion": [v > 0 for v in lesion_voxels],
            "dice@healthy_fpr_5": dice,
            "auprc": dice,
            "true_volume_voxels": lesion_voxels,
            "region_voxels": region_voxels,
        }
    ).to_csv(path, index=False)
    return path


@pytest.fixture
def metric_paths(tmp_path):
    """Methods a and b, two folds, a lesion cohort and a healthy one; b's evaluated region
    is smaller (another erosion), so its prevalence differs."""
    paths = {}
    for method, region in (("a", 1000), ("b", 800)):
        for fold in (0, 1):
            paths[(method, fold, "brats")] = _metrics_csv(
                tmp_path / f"{method}{fold}_brats.csv", [20, 0], [region, region], [0.5, np.nan]
            )
            paths[(method, fold, "ixi")] = _metrics_csv(
                tmp_path / f"{method}{fold}_ixi.csv", [0], [region], [np.nan]
            )
    return paths


def test_lesion_prevalence_per_method_and_note(metric_paths):
    prevalence = lesion_prevalence(collect_metrics(metric_paths))
    row = prevalence.set_index(["dataset", "method"])["lesion_prevalence"]
    assert row[("brats", "a")] == pytest.approx(20 / 2000)
    assert row[("brats", "b")] == pytest.approx(20 / 1600)
    note = prevalence_note(prevalence, ["brats"], ["b", "a"])
    assert note.endswith(": brats 1.25 % (b), 1.00 % (a).")
    same = prevalence[prevalence["method"] == "a"]
    assert prevalence_note(same, ["brats", "ixi"], ["a"]).endswith(": brats 1.00 %; ixi 0.00 %.")
    assert prevalence_note(prevalence, ["atlas"], ["a"]) is None


def test_build_tables_writes_note_once_and_declared_files(metric_paths, tmp_path):
    summaries = {}
    for key in metric_paths:
        path = tmp_path / ("_".join(map(str, key)) + ".json")
        path.write_text(
            json.dumps({"slice_level": {"slice_auroc": 0.7, "slice_auprc": 0.3, "n_slices": 40}})
        )
        summaries[key] = path
    out = tmp_path / "tables"
    _, written = build_tables(
        metric_paths=metric_paths,
        by_metric_dir=out / "by_metric",
        main_dir=out,
        default_protocol="healthy_fpr_5",
        method_order=["a", "b"],
        dataset_order=["brats", "ixi"],
        lesion_datasets=["brats"],
        prevalence_path=out / "prevalence.csv",
        summary_paths=summaries,
    )
    assert out / "prevalence.csv" in written
    main_md = (out / "main.md").read_text()
    assert main_md.count("Lesion prevalence") == 1
    assert "brats 1.00 % (a), 1.25 % (b)." in main_md
    assert "Lesion prevalence" in (out / "main.tex").read_text()
    assert list(pd.read_csv(out / "prevalence.csv").columns) == [
        "dataset",
        "method",
        "lesion_prevalence",
    ]
    slice_csv = pd.read_csv(out / "by_metric" / "slice_auroc.csv")
    assert "n_slices" in slice_csv.columns and "n_subjects" not in slice_csv.columns
    assert (slice_csv["n_slices"] == 40).all()


def test_build_tables_without_prevalence_columns_has_no_note(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["s"], "has_lesion": [True], "dice@healthy_fpr_5": [0.5]}).to_csv(
        path, index=False
    )
    build_tables(
        metric_paths={("a", 0, "brats"): path},
        by_metric_dir=tmp_path / "by_metric",
        main_dir=tmp_path,
        default_protocol="healthy_fpr_5",
        method_order=["a"],
        dataset_order=["brats"],
        lesion_datasets=["brats"],
        prevalence_path=tmp_path / "prevalence.csv",
    )
    assert "prevalence" not in (tmp_path / "main.md").read_text()
    assert "prevalence" not in (tmp_path / "main.tex").read_text()


# --- qualitative examples -------------------------------------------------------------------


@pytest.fixture
def toy(tmp_path):
    """Five subjects of 4 slices; lesion areas per subject differ so the ranking is known."""
    slice_path = tmp_path / "toy.h5"
    areas = {"s0": [0, 0, 0, 0], "s1": [0, 4, 9, 0], "s2": [0, 0, 0, 0], "s3": [16, 0, 1, 0]}
    areas["s4"] = [25, 0, 0, 0]  # largest, but not scored
    with SliceWriter(slice_path, sequences=["t2"], height=H, width=W) as writer:
        for subject, per_slice in areas.items():
            brain = np.zeros((4, H, W), np.uint8)
            brain[:, 2:14, 2:14] = 1
            seg = np.zeros_like(brain)
            for s, area in enumerate(per_slice):
                side = int(np.sqrt(area))
                seg[s, 4 : 4 + side, 4 : 4 + side] = 1
            images = (brain[:, None] * 0.5).astype(np.float32)
            writer.append_subject(subject, images, brain, seg, np.arange(4))
    slices = SliceFile(slice_path)
    rows = slices.rows_for_subjects(["s0", "s1", "s2", "s3"])
    data = slices.read(rows)
    scores = {}
    thresholds = {}
    for method, offset in (("m1", 0.0), ("m2", 0.1)):
        scores[method] = tmp_path / f"{method}.h5"
        amap = (data["seg"] + offset).astype(np.float32) * data["brainmask"]
        attrs = {"method": method, "fold": 0, "dataset": "toy", "split": "test"}
        with ScoresWriter(
            scores[method], rows=rows[::-1], height=H, width=W, channels=None, attrs=attrs
        ) as writer:
            writer.write(amap[::-1])
        thresholds[method] = tmp_path / f"{method}.json"
        thresholds[method].write_text(json.dumps({"thresholds": {"p": {"threshold": 0.5}}}))
    return slice_path, scores, thresholds


def test_largest_lesion_slices(toy):
    slice_path, scores, _ = toy
    assert largest_lesion_slices(slice_path, scores["m1"], 3) == [
        ("s3", 0),
        ("s1", 2),
        ("s1", 1),
    ]
    assert largest_lesion_slices(slice_path, scores["m1"], 10)[-1] == ("s3", 2)


def test_qualitative_examples_assemble_only_the_chosen_subjects(toy, monkeypatch):
    slice_path, scores, thresholds = toy
    assembled = []
    real = aggregate.iter_subject_volumes

    def recording(*args, **kwargs):
        for volume in real(*args, **kwargs):
            assembled.append(volume.subject)
            yield volume

    monkeypatch.setattr(aggregate, "iter_subject_volumes", recording)
    cfg = PostprocessConfig(erode_iterations=0, median_kernel=1, min_component_voxels=0)
    examples = qualitative_examples(
        dataset="toy",
        methods=["m1", "m2"],
        slice_path=slice_path,
        scores_paths=scores,
        threshold_paths=thresholds,
        protocol="p",
        postprocess={"m1": cfg, "m2": cfg},
        n_examples=2,
    )
    assert sorted(assembled) == ["s1", "s1", "s3", "s3"]
    assert [e["method"] for e in examples] == ["m1", "m1", "m2", "m2"]
    areas = sorted(int(e["ground_truth"].sum()) for e in examples if e["method"] == "m1")
    assert areas == [9, 16]
    for example in examples:
        np.testing.assert_array_equal(example["thresholded"], example["ground_truth"])


def test_unknown_metric_column_is_an_error_not_dropped():
    from brainuad.evaluation.aggregate import tabulated_metrics

    columns = ["dice@healthy_fpr_5", "auprc", "n_slices", "pred_volume_voxels@healthy_fpr_5"]
    assert tabulated_metrics(columns) == ["dice@healthy_fpr_5", "auprc"]
    with pytest.raises(InputError, match="dcie"):
        tabulated_metrics([*columns, "dcie@healthy_fpr_5"])


def test_main_table_shows_both_threshold_protocols_and_the_evaluation_mode(tmp_path):
    paths, summaries = {}, {}
    for fold in (0, 1):
        path = tmp_path / f"a{fold}.csv"
        pd.DataFrame(
            {
                "subject": ["s0", "s1"],
                "has_lesion": [True, True],
                "dice@healthy_fpr_5": [0.2, 0.4],
                "dice@best_dice_val": [0.5, 0.7],
                "auprc": [0.6, 0.6],
            }
        ).to_csv(path, index=False)
        paths[("a", fold, "brats")] = path
        summaries[("a", fold, "brats")] = tmp_path / f"a{fold}.json"
        grid = {"mode": "reference", "extent_mm": 100, "slice_spacing_mm": 2, "n_slices": 50}
        summaries[("a", fold, "brats")].write_text(
            json.dumps({"slice_level": {}, "evaluation": {**grid, "absent_slices": fold}})
        )
    kwargs = {
        "metric_paths": paths,
        "by_metric_dir": tmp_path / "by_metric",
        "main_dir": tmp_path,
        "default_protocol": "best_dice_val",
        "main_protocols": ["best_dice_val", "healthy_fpr_5"],
        "method_order": ["a"],
        "dataset_order": ["brats"],
        "lesion_datasets": ["brats"],
        "prevalence_path": tmp_path / "prevalence.csv",
        "summary_paths": summaries,
    }
    build_tables(**kwargs)
    main_md = (tmp_path / "main.md").read_text()
    header = next(line for line in main_md.splitlines() if line.startswith("| Method"))
    assert header.index("best val. Dice, pixel labels") < header.index("5 % healthy FPR")
    assert "label-free" in header and "AUPRC" in header
    row = next(line for line in main_md.splitlines() if line.startswith("| a "))
    cells = [cell.strip().strip("*") for cell in row.split("|")[2:5]]
    assert cells == ["60.0 ± 0.0", "30.0 ± 0.0", "60.0 ± 0.0"]
    assert "uses validation pixel labels" in main_md and "(label-free)" in main_md
    assert "reference grid (cDDPM): the central 100 mm of the slice axis at 2 mm" in main_md
    assert set(pd.read_csv(tmp_path / "main.csv")["metric"]) == {
        "dice@best_dice_val",
        "dice@healthy_fpr_5",
        "auprc",
    }
    summaries[("a", 1, "brats")].write_text(json.dumps({"slice_level": {}}))
    with pytest.raises(InputError, match="different evaluation modes"):
        build_tables(**kwargs)
