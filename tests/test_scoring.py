"""Scoring a split into a scores file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_hparams import AE_TINY, DDPM_TINY

from brainuad.errors import InputError
from brainuad.io.scores import ScoresFile
from brainuad.methods import build_method
from brainuad.provenance import seed_everything
from brainuad.scoring import score_dataset_splits, score_split
from brainuad.slices.hdf5 import SliceFile, SliceWriter
from brainuad.slices.splits import write_splits


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """12 slices of 2 channels, each slice filled with its own row number / 20."""
    path = tmp_path_factory.mktemp("data") / "slices.h5"
    with SliceWriter(path, sequences=["t1", "t2"], height=32, width=32) as writer:
        for s in range(3):
            rows = np.arange(4 * s, 4 * s + 4, dtype=np.float32)
            images = np.ones((4, 2, 32, 32), np.float32) * (rows[:, None, None, None] / 20)
            mask = np.ones((4, 32, 32), np.uint8)
            writer.append_subject(f"sub-{s}", images, mask, np.zeros_like(mask), np.arange(4))
    return path


@pytest.mark.parametrize("name, hparams", [("ae", AE_TINY), ("ddpm", DDPM_TINY)])
def test_scores_aligned_with_rows(slices, tmp_path, name, hparams):
    seed_everything(0)
    method = build_method(name, in_channels=2, **hparams)
    rows = np.array([7, 2, 11, 0, 5])  # any order, kept as given
    out = tmp_path / "scores.h5"
    summary = score_split(
        method,
        slice_path=slices,
        rows=rows,
        out_path=out,
        batch_size=2,
        device="cpu",
        attrs={"fold": 0, "dataset": "toy", "split": "test"},
        progress=False,
    )
    assert summary["rows"] == 5
    scores = ScoresFile(out)
    np.testing.assert_array_equal(scores.rows, rows)
    data = scores.read(reconstruction=True)
    assert data["anomaly_map"].shape == (5, 32, 32)
    assert np.isfinite(data["anomaly_map"]).all()
    assert scores.has_reconstruction
    assert data["reconstruction"].shape == (5, 2, 32, 32)
    assert scores.attrs["method"] == name and scores.attrs["split"] == "test"
    assert "git_commit" in json.loads(scores.attrs["provenance"])

    # Row i of the scores file is the map of slice-file row rows[i]: score each batch of the
    # file (batch_size 2) directly; noise is seeded per batch, so maps match exactly.
    for batch in (slice(0, 2), slice(2, 4)):
        images = SliceFile(slices).read(rows[batch])
        direct = method.score(
            torch.from_numpy(images["images"]),
            torch.from_numpy(images["brainmask"][:, None].astype(np.float32)),
        )
        np.testing.assert_array_equal(direct.anomaly_map.numpy(), data["anomaly_map"][batch])
        np.testing.assert_array_equal(direct.reconstruction.numpy(), data["reconstruction"][batch])


def test_rows_out_of_range(slices, tmp_path):
    method = build_method("ae", **AE_TINY, in_channels=2)
    with pytest.raises(InputError, match="rows"):
        score_split(
            method,
            slice_path=slices,
            rows=[0, 12],
            out_path=tmp_path / "s.h5",
            batch_size=4,
            device="cpu",
            attrs={},
            progress=False,
        )
    assert not (tmp_path / "s.h5").exists()


def test_dataset_job_scores_each_split_of_its_fold(slices, tmp_path):
    """One scoring job writes the val and the test scores of a fold from one model file:
    each file holds exactly the rows of its split's subjects; a split without a subject
    is refused before any file is written."""
    seed_everything(0)
    model = tmp_path / "model.pt"
    build_method("ae", in_channels=2, **AE_TINY).save(model)
    splits = tmp_path / "splits.csv"
    write_splits(
        pd.DataFrame(
            {"subject": ["sub-0", "sub-1", "sub-2"], "split": ["train", "val", "test"], "fold": 0}
        ),
        splits,
    )
    outs = {"val": tmp_path / "val.h5", "test": tmp_path / "test.h5"}
    common = dict(
        model_path=model, slice_path=slices, splits_path=splits, fold=0, batch_size=3,
        device="cpu",
    )  # fmt: skip
    summaries = score_dataset_splits(out_paths=outs, **common)
    assert set(summaries) == {"val", "test"}
    np.testing.assert_array_equal(ScoresFile(outs["val"]).rows, [4, 5, 6, 7])
    np.testing.assert_array_equal(ScoresFile(outs["test"]).rows, [8, 9, 10, 11])
    assert ScoresFile(outs["test"]).attrs["split"] == "test"

    write_splits(
        pd.DataFrame({"subject": ["sub-0", "sub-1", "sub-2"], "split": "test", "fold": 0}),
        splits,
    )
    empty = {"val": tmp_path / "val2.h5", "test": tmp_path / "test2.h5"}
    with pytest.raises(InputError, match="no subject in split 'val'"):
        score_dataset_splits(out_paths=empty, **common)
    assert not any(path.exists() for path in empty.values())
