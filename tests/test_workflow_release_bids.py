"""The cddpm_release and bids adapters through the real workflow: sheet -> preprocessing ->
slices -> splits, in one Snakemake run on fixtures in their layouts
(brainuad.data.layout_fixtures): the release's IXI set is the healthy cohort and keeps the
release's folds; its Brats21 set is a T2-only lesion cohort; a BIDS lesion cohort and a
healthy BIDS dataset. Tiny output grids (tests' config/tiny.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from test_workflow_datasets import snakemake
from tiny_config import tiny_config_for_other_datasets

from brainuad.data.adapters.cddpm_release import subject_key
from brainuad.data.layout_fixtures import write_bids, write_cddpm_release
from brainuad.slices.splits import healthy_splits

# Heavy end-to-end runs: `make test-all`, not CI's `make test` (its 30-minute budget).
pytestmark = pytest.mark.extended

# dataset -> (source, lesion, path below the data folder, own preprocess, slice channels)
DATASETS = {
    "rel_ixi": ("cddpm_release", "none", "release/Train/ixi", {}, ["t1", "t2"]),
    "rel_brats": ("cddpm_release", "tumour", "release/Test/Brats21", {"sequences": ["t2"]}, ["t2"]),
    "own": ("bids", "wmh", "bids", {}, ["t1", "t2"]),
    "own_healthy": ("bids", "none", "bids_healthy", {}, ["t1", "t2"]),
}
N_SUBJECTS = {"rel_ixi": 3, "rel_brats": 2, "own": 2, "own_healthy": 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("release_bids_study")
    data = base / "data"
    write_cddpm_release(data / "release", n_subjects=4, seed=2)
    write_bids(data / "bids", n_subjects=2, seed=2)
    write_bids(data / "bids_healthy", n_subjects=2, seed=2, lesion="none")
    config = tiny_config_for_other_datasets()
    config["data_dir"] = str(data)
    config["datasets"] = {
        name: {"source": source, "lesion": lesion, "path": path}
        | ({"preprocess": own} if own else {})
        for name, (source, lesion, path, own, _) in DATASETS.items()
    }
    config["datasets"]["own"]["layout"] = {"derivatives": "lesions"}
    config["healthy_dataset"] = "rel_ixi"

    config["slices"]["sequences"] = ["t1", "t2"]
    configfile = base / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    targets = [
        f"results/{kind}/{name}.{ext}"
        for name in DATASETS
        for kind, ext in (("slices", "h5"), ("splits", "csv"), ("qc", "csv"))
    ]
    snakemake(base / "work", configfile, *targets, "--cores", "2")
    return base


@pytest.mark.slow
def test_release_folds_are_the_study_folds(study: Path) -> None:
    """Every (subject, fold) of the healthy cohort is where the release's CSVs put it."""
    splits_dir = study / "data" / "release" / "splits"
    expected = {}
    for path in sorted(splits_dir.glob("IXI_*.csv")):
        parts = path.stem.split("_")  # IXI_train_fold0, IXI_val_fold1, IXI_test
        folds = [int(parts[2].removeprefix("fold"))] if len(parts) == 3 else [0, 1]
        for img in pd.read_csv(path)["img_path"]:
            for fold in folds:
                expected[(subject_key(Path(img).name), fold)] = parts[1]
    sheet = pd.read_csv(study / "work" / "results" / "subjects" / "rel_ixi.tsv", sep="\t")
    key_of = {
        s: i.split("/")[-1] for s, i in zip(sheet["subject"], sheet["source_id"], strict=True)
    }
    splits = pd.read_csv(study / "work" / "results" / "splits" / "rel_ixi.csv")
    got = {(key_of[r.subject], r.fold): r.split for r in splits.itertuples()}
    assert got == {k: v for k, v in expected.items() if k[0] in key_of.values()}
    assert len(got) == 6
    drawn = healthy_splits(sheet["subject"], n_folds=2, test_fraction=0.2, seed=3141)
    assert not drawn.equals(splits), "the drawn splits differ: the release decided these"
    lesion = pd.read_csv(study / "work" / "results" / "splits" / "rel_brats.csv")
    assert lesion.groupby("subject")["split"].agg(set).to_dict() == {
        "sub-Brats2100000": {"val"},
        "sub-Brats2100001": {"test"},
    }


@pytest.mark.slow
def test_sheets_list_skipped_subjects(study: Path) -> None:
    logs = study / "work" / "logs" / "subject_sheet"
    assert "skipped IXI015-Guys-1003: no t2 image" in (logs / "rel_ixi.log").read_text()
    own = (logs / "own.log").read_text()
    assert "skipped sub-03: no T2w image" in own
    assert "skipped sub-04/ses-1: no lesion mask" in own


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_reaches_slices_and_splits(study: Path, dataset: str) -> None:
    work = study / "work"
    channels = DATASETS[dataset][4]
    with h5py.File(work / "results" / "slices" / f"{dataset}.h5") as f:
        assert json.loads(f.attrs["sequences"]) == channels
        assert f["images"].shape[1:] == (len(channels), 32, 32)
        assert len(set(f["subject"].asstr()[:])) == N_SUBJECTS[dataset]
        values = set(np.unique(f["seg"][:]).tolist())
        if DATASETS[dataset][1] == "none":
            assert values == {0}
        else:
            assert values == {0, 1} and f["label"][:].any()
    splits = pd.read_csv(work / "results" / "splits" / f"{dataset}.csv")
    assert splits["subject"].nunique() == N_SUBJECTS[dataset]


@pytest.mark.slow
def test_preprocessing_follows_the_adapters_defaults(study: Path) -> None:
    def qc(dataset):
        folder = study / "work" / "results" / "preprocessed" / dataset
        return json.loads(next(folder.glob("*/qc.json")).read_text())

    for dataset in ("rel_ixi", "rel_brats"):
        record = qc(dataset)
        assert record["skullstrip_method"] == "none"
        assert record["settings"]["registration_type"] is None  # used as is
        assert record["settings"]["n4"] is False
        assert "n4" not in record["runtimes_s"] or record["runtimes_s"]["n4"] < 0.05
        # The release's brain mask agrees with the stripped volume's non-zero voxels.
        assert record["brainmask_dice_vs_truth"] > 0.95, record
    for dataset in ("own", "own_healthy"):
        record = qc(dataset)
        assert record["skullstrip_method"] == "deepbet"
        assert record["settings"]["coregister_sequences"] is True
        assert record["settings"]["n4"] is True
        assert record["registered_brainmask_dice_vs_template"] > 0.7, record
