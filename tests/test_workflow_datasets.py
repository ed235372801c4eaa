"""Every adapter through the real workflow: sheet -> preprocessing -> slices -> splits.

One Snakemake invocation builds the data targets of five datasets written in their real
download layouts (brainuad.data.layout_fixtures; 2 subjects per lesion cohort, 3 healthy
IXI subjects for the 2-fold splits plus one without T2, which is skipped; tiny output grids).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_config import tiny_config_for_other_datasets

from brainuad.data.layout_fixtures import WRITERS

# Heavy end-to-end runs: `make test-all`, not CI's `make test` (its 30-minute budget).
pytestmark = pytest.mark.extended

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config" / "tiny.yaml"

# dataset -> (source, lesion, own preprocess settings, expected slice channels)
DATASETS = {
    "ixi": ("ixi", "none", {}, ["t1", "t2"]),
    "brats": ("brats2021", "tumour", {"sequences": ["t2"]}, ["t2"]),
    "atlas": ("atlas2", "stroke", {}, ["t1"]),
    "wmh": ("wmh2017", "wmh", {"sequences": ["t1"]}, ["t1"]),
    "mslub": ("mslub", "ms", {}, ["t1", "t2"]),
}


def study_config(data: Path) -> dict:
    config = tiny_config_for_other_datasets()
    config["datasets"] = {
        name: {"source": source, "lesion": lesion, "path": str(data / source)}
        | ({"preprocess": own} if own else {})
        for name, (source, lesion, own, _) in DATASETS.items()
    }
    config["healthy_dataset"] = "ixi"
    config["preprocess"]["sequences"] = ["t1", "t2"]
    config["slices"]["sequences"] = ["t1", "t2"]
    return config


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir), *args, "--configfile", str(configfile),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("datasets_study")
    for source, *_ in DATASETS.values():
        WRITERS[source](base / "data" / source, n_subjects=4 if source == "ixi" else 2, seed=2)
    configfile = base / "config.yaml"
    configfile.write_text(yaml.safe_dump(study_config(base / "data")))
    targets = [
        f"results/{kind}/{name}.{ext}"
        for name in DATASETS
        for kind, ext in (("slices", "h5"), ("splits", "csv"), ("qc", "csv"))
    ]
    snakemake(base / "work", configfile, *targets, "--cores", "2")
    return base / "work"


@pytest.mark.slow
def test_sheets_list_subjects_and_skipped_ones(study: Path) -> None:
    ixi = pd.read_csv(study / "results" / "subjects" / "ixi.tsv", sep="\t")
    assert ixi["subject"].tolist() == ["sub-IXI012", "sub-IXI013", "sub-IXI014"]
    log = (study / "logs" / "subject_sheet" / "ixi.log").read_text()
    assert "skipped IXI015: no t2 image" in log
    atlas = pd.read_csv(study / "results" / "subjects" / "atlas.tsv", sep="\t")
    assert atlas["subject"].tolist() == ["sub-r001s001", "sub-r001s002"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_reaches_slices_and_splits(study: Path, dataset: str) -> None:
    channels = DATASETS[dataset][3]
    n_subjects = 3 if dataset == "ixi" else 2
    with h5py.File(study / "results" / "slices" / f"{dataset}.h5") as f:
        assert json.loads(f.attrs["sequences"]) == channels
        assert f["images"].shape[1:] == (len(channels), 32, 32)
        assert len(set(f["subject"].asstr()[:])) == n_subjects
        seg = f["seg"][:]
        if dataset != "ixi":
            assert f["label"][:].any(), "lesion slices expected"
        values = set(np.unique(seg).tolist())
        expected = {"ixi": {0}, "brats": {0, 1, 2, 4}, "atlas": {0, 1}, "wmh": {0, 1}}
        assert values <= expected.get(dataset, {0, 1}), values
        if dataset == "brats":
            assert len(values) >= 3, values  # sub-labels kept for per-region metrics
        assert ("ignore" in f) == (dataset == "wmh")
        if dataset == "wmh":
            assert f["ignore"][:].any()
    splits = pd.read_csv(study / "results" / "splits" / f"{dataset}.csv")
    assert splits["subject"].nunique() == n_subjects
    assert not splits.groupby(["fold", "subject"]).size().gt(1).any()
    preprocessed = {p.name for p in (study / "results" / "preprocessed" / dataset).glob("*/*")}
    assert {f"{s}.nii.gz" for s in DATASETS[dataset][2].get("sequences", channels)} <= preprocessed


@pytest.mark.slow
def test_preprocessing_follows_each_adapters_defaults(study: Path) -> None:
    qc = {
        dataset: json.loads(
            next((study / "results" / "preprocessed" / dataset).glob("*/qc.json")).read_text()
        )
        for dataset in DATASETS
    }
    assert qc["brats"]["skullstrip_method"] == "none"
    assert qc["atlas"]["settings"]["registration_type"] is None  # in MNI already
    assert qc["ixi"]["settings"]["coregister_sequences"] is True
    assert qc["mslub"]["skullstrip_method"] == "deepbet"
    for dataset, record in qc.items():
        assert record["registered_brainmask_dice_vs_template"] > 0.7, (dataset, record)
