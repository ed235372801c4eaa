"""Volumes from slice + scores files, and the calibration / metrics orchestration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.evaluate import calibrate_from_scores, subject_metrics_table
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.evaluation.volumes import iter_subject_volumes
from brainuad.io.scores import ScoresFile, ScoresWriter
from brainuad.slices.hdf5 import SliceFile, SliceWriter

H = W = 32


def _write_scores(
    path, slice_path, subjects, split, rng, *, shuffle=True, reconstruct=False, map_fn=None
):
    sf = SliceFile(slice_path)
    rows = sf.rows_for_subjects(subjects)
    if shuffle:
        rows = rng.permutation(rows)
    data = sf.read(rows)
    if map_fn is None:
        amap = data["seg"].astype(np.float32) + 0.3 * rng.random((rows.size, H, W))
        amap *= data["brainmask"]
    else:
        amap = map_fn(data)
    attrs = {"method": "toy", "fold": 0, "dataset": "toy"}
    if split is not None:  # None: a file that does not say which split it scored
        attrs["split"] = split
    c = data["images"].shape[1]
    with ScoresWriter(
        path, rows=rows, height=H, width=W, channels=c if reconstruct else None, attrs=attrs
    ) as w:
        reco = data["images"] * (1 - data["seg"][:, None]) if reconstruct else None
        w.write(amap, reco)
    return path


def _subject(rng, n_slices, lesion):
    brain = np.zeros((n_slices, H, W), np.uint8)
    brain[:, 4:28, 4:28] = 1
    seg = np.zeros_like(brain)
    if lesion:
        seg[2:6, 10:18, 10:18] = 1
    images = (rng.random((n_slices, 1, H, W)) * brain[:, None]).astype(np.float32)
    return images, brain, seg


@pytest.fixture
def toy(tmp_path):
    """A dataset of 4 healthy and 4 lesion subjects, 8 slices each."""
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.h5"
    with SliceWriter(path, sequences=["t2"], height=H, width=W) as w:
        for i in range(8):
            images, brain, seg = _subject(rng, 8, lesion=i >= 4)
            w.append_subject(f"s{i}", images, brain, seg, np.arange(8))
    return path, rng


def test_volumes_follow_slice_index_even_when_rows_are_shuffled(tmp_path):
    rng = np.random.default_rng(1)
    slice_path = tmp_path / "order.h5"
    order = {"a": np.array([5, 3, 4, 7]), "b": np.array([1, 0])}  # a lacks slice 6
    with SliceWriter(slice_path, sequences=["t1", "t2"], height=H, width=W) as w:
        for name, idx in order.items():
            n = idx.size
            images = np.broadcast_to(idx[:, None, None, None], (n, 2, H, W)).astype(np.float32)
            brain = np.ones((n, H, W), np.uint8)
            seg = np.zeros((n, H, W), np.uint8)
            seg[np.arange(n), idx, 0] = 1  # the lesion pixel's row encodes the slice index
            w.append_subject(name, images, brain, seg, idx)

    def encode(data):  # map value = slice index, so order can be read back
        return np.broadcast_to(data["slice_index"][:, None, None], (len(data["row"]), H, W))

    scores_path = _write_scores(
        tmp_path / "s.h5", slice_path, ["a", "b"], "test", rng, reconstruct=True, map_fn=encode
    )
    vols = {
        v.subject: v
        for v in iter_subject_volumes(
            slice_path, scores_path, with_images=True, with_reconstruction=True
        )
    }
    a = vols["a"]
    np.testing.assert_array_equal(a.slice_index, [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(a.present, [True, True, True, False, True])
    np.testing.assert_array_equal(a.anomaly_map[:, 0, 0], [3, 4, 5, 0, 7])
    np.testing.assert_array_equal(a.image[:, 1, 0, 0], [3, 4, 5, 0, 7])
    assert a.rows[3] == -1 and not a.brainmask[3].any()
    assert a.seg.dtype == bool and a.reconstruction.shape == a.image.shape
    for s, idx in enumerate(a.slice_index):
        if a.present[s]:
            assert np.flatnonzero(a.seg[s, :, 0]).tolist() == [idx]
    np.testing.assert_array_equal(vols["b"].anomaly_map[:, 0, 0], [0, 1])
    assert vols["b"].image is not None and vols["b"].label.tolist() == [1, 1]


def test_volumes_of_selected_subjects_only(toy, tmp_path):
    path, rng = toy
    scores = _write_scores(tmp_path / "s.h5", path, ["s1", "s4", "s6"], "test", rng)
    picked = list(iter_subject_volumes(path, scores, subjects={"s6", "s1"}))
    first_rows = {
        s: np.flatnonzero(SliceFile(path).subjects[ScoresFile(scores).rows] == s)[0]
        for s in ("s1", "s6")
    }
    assert [v.subject for v in picked] == sorted(first_rows, key=first_rows.get)
    with pytest.raises(InputError, match=r"s\.h5: subject\(s\) \['s2'\] not scored"):
        list(iter_subject_volumes(path, scores, subjects=["s2"]))


def test_volumes_refuse_bad_rows(tmp_path):
    rng = np.random.default_rng(2)
    slice_path = tmp_path / "dup.h5"
    with SliceWriter(slice_path, sequences=["t2"], height=H, width=W) as w:
        images, brain, seg = _subject(rng, 2, lesion=False)
        w.append_subject("a", images, brain, seg, np.array([4, 4]))
    scores = _write_scores(tmp_path / "s.h5", slice_path, ["a"], "test", rng)
    with pytest.raises(InputError, match="repeated 'slice_index'"):
        list(iter_subject_volumes(slice_path, scores))
    bad = tmp_path / "bad.h5"
    with ScoresWriter(bad, rows=np.array([7]), height=H, width=W, channels=None, attrs={}) as w:
        w.write(np.zeros((1, H, W), np.float32))
    with pytest.raises(InputError, match="field 'row'"):
        list(iter_subject_volumes(slice_path, bad))


def test_calibrate_from_scores(toy, tmp_path):
    path, rng = toy
    healthy = _write_scores(tmp_path / "h.h5", path, ["s0", "s1"], "val", rng)
    lesion = _write_scores(tmp_path / "l.h5", path, ["s4", "s5"], "val", rng)
    cfg = PostprocessConfig()
    doc = calibrate_from_scores(
        healthy_val=[(path, healthy)], lesion_val={"toy": (path, lesion)}, postprocess=cfg
    )
    json.dumps(doc)
    t = doc["thresholds"]
    assert set(t) == {"healthy_fpr_5", "healthy_fpr_1", "best_dice_val/toy"}
    assert t["healthy_fpr_1"]["threshold"] >= t["healthy_fpr_5"]["threshold"]
    assert t["healthy_fpr_5"]["chosen_on"]["subjects"] == ["s0", "s1"]
    assert t["best_dice_val/toy"]["chosen_on"]["uses_pixel_labels"] is True
    assert t["best_dice_val/toy"]["pooled_dice_val"] > 0.7  # the 5^3 median rounds the cube
    assert t["healthy_fpr_5"]["chosen_on"]["scores_files"] == [str(healthy)]
    assert t["best_dice_val/toy"]["chosen_on"]["scores_files"] == [str(lesion)]
    assert all(e["chosen_on"]["split"] == "val" for e in t.values())

    test_scores = _write_scores(tmp_path / "t.h5", path, ["s2"], "test", rng)
    with pytest.raises(InputError, match=r"t\.h5: attribute 'split' is 'test'"):
        calibrate_from_scores(healthy_val=[(path, test_scores)], lesion_val={}, postprocess=cfg)
    with pytest.raises(InputError, match=r"t\.h5: attribute 'split' is 'test'"):
        calibrate_from_scores(
            healthy_val=[(path, healthy)], lesion_val={"toy": (path, test_scores)}, postprocess=cfg
        )
    unlabelled = _write_scores(tmp_path / "u.h5", path, ["s0"], None, rng)
    with pytest.raises(InputError, match=r"u\.h5: no attribute 'split'"):
        calibrate_from_scores(healthy_val=[(path, unlabelled)], lesion_val={}, postprocess=cfg)
    with pytest.raises(InputError, match="lesion voxels"):
        calibrate_from_scores(healthy_val=[(path, lesion)], lesion_val={}, postprocess=cfg)


def test_subject_metrics_table(toy, tmp_path):
    path, rng = toy
    cfg = PostprocessConfig(erode_iterations=1, median_kernel=3)
    healthy = _write_scores(tmp_path / "h.h5", path, ["s0", "s1"], "val", rng)
    lesion = _write_scores(tmp_path / "l.h5", path, ["s4", "s5"], "val", rng)
    doc = calibrate_from_scores(
        healthy_val=[(path, healthy)], lesion_val={"toy": (path, lesion)}, postprocess=cfg
    )
    test = _write_scores(
        tmp_path / "t.h5", path, ["s2", "s3", "s6", "s7"], "test", rng, reconstruct=True
    )
    table, slice_level = subject_metrics_table(
        slice_path=path,
        scores_path=test,
        thresholds=doc,
        postprocess=cfg,
        image_score="max",
        voxel_volume_ml=0.001,
    )
    assert sorted(table["subject"]) == ["s2", "s3", "s6", "s7"]
    for p in ("healthy_fpr_5", "healthy_fpr_1", "best_dice_val/toy"):
        for key in ("dice", "hd95", "fpr", "pred_volume_voxels", "lesion_tp", "lesion_f1"):
            assert f"{key}@{p}" in table.columns
    for key in (
        "has_lesion",
        "auroc",
        "auprc",
        "oracle_dice",
        "true_volume_ml",
        "recon_ssim",
        "mse_anomaly_region",
        "ssim_healthy_region",
    ):
        assert key in table.columns
    sick = table[table["has_lesion"]]
    well = table[~table["has_lesion"]]
    assert len(sick) == 2 and len(well) == 2
    assert (sick["dice@best_dice_val/toy"] > 0.9).all()
    assert (sick["auroc"] > 0.99).all()
    # No lesion: lesion metrics are NaN whether or not anything is flagged (the loose 5 %
    # threshold flags voxels of both healthy subjects); FPR and lesion_fp still count.
    assert (well["pred_volume_voxels@healthy_fpr_5"] > 0).all()
    for key in ("dice", "hd95", "lesion_precision", "lesion_recall", "lesion_f1"):
        assert well[f"{key}@healthy_fpr_5"].isna().all()
    assert (well["fpr@healthy_fpr_5"] > 0).all() and (well["lesion_fp@healthy_fpr_5"] > 0).all()
    assert well["auroc"].isna().all()
    assert (well["fpr@healthy_fpr_5"] <= 0.05 + 0.02).all()
    assert (sick["lesion_tp@best_dice_val/toy"] == 1).all()
    assert slice_level["image_score"] == "max" and slice_level["n_slices"] == 32
    assert slice_level["n_positive_slices"] == 8 and slice_level["slice_auroc"] > 0.9
    assert not math.isnan(well["recon_l1"].iloc[0])
    assert math.isnan(well["mse_anomaly_region"].iloc[0])

    other = PostprocessConfig(median_kernel=5)
    with pytest.raises(InputError, match="calibrated with postprocess"):
        subject_metrics_table(slice_path=path, scores_path=test, thresholds=doc, postprocess=other)


def test_thresholds_for_dataset_keeps_own_best_dice_only() -> None:
    from brainuad.evaluation.evaluate import thresholds_for_dataset

    record = {
        "thresholds": {
            "healthy_fpr_5": {"threshold": 0.5},
            "best_dice_val/brats": {"threshold": 0.3},
            "best_dice_val/wmh": {"threshold": 0.2},
        }
    }
    assert thresholds_for_dataset(record, "brats") == {
        "healthy_fpr_5": {"threshold": 0.5},
        "best_dice_val": {"threshold": 0.3},
    }
    assert thresholds_for_dataset(record, "ixi") == {"healthy_fpr_5": {"threshold": 0.5}}


def test_metrics_job_runs_without_importing_torch() -> None:
    """The per-dataset metrics jobs are many; their imports stay off torch (seconds of
    start-up per job otherwise)."""
    script = Path(__file__).parents[1] / "workflow_scripts" / "subject_metrics.py"
    imports = "\n".join(
        line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))
    )
    probe = f"{imports}\nimport sys\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
