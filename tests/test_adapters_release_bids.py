"""The cddpm_release and bids adapters on fixtures in their layouts
(brainuad.data.layout_fixtures): discovery, the release's own folds, layout options, the
per-dataset settings, and the errors bad downloads give when the sheet is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_adapters import BAD, first, rewrite
from tiny_config import tiny_config_for_other_datasets

from brainuad.config import ConfigError
from brainuad.data.adapters import ADAPTERS
from brainuad.data.adapters.cddpm_release import read_release_splits, subject_key
from brainuad.data.datasets import check_datasets, dataset_labels, dataset_preprocess
from brainuad.data.layout_fixtures import write_bids, write_cddpm_release
from brainuad.data.sheet import RELEASE_SPLIT, build_sheet, read_sheet, write_sheet
from brainuad.errors import InputError
from brainuad.slices.splits import check_splits, healthy_splits, release_splits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("release_bids")
    write_cddpm_release(base / "release", n_subjects=4, seed=1)
    write_bids(base / "bids", n_subjects=2, seed=1)
    write_bids(base / "bids_healthy", n_subjects=2, seed=1, lesion="none")
    return {
        "release": base / "release",
        "bids": base / "bids",
        "bids_healthy": base / "bids_healthy",
    }


@pytest.fixture
def copy_of(layouts, tmp_path):
    def copy(name: str) -> Path:
        shutil.copytree(layouts[name], tmp_path / name)
        return tmp_path / name

    return copy


def release_ixi(folder: Path, sequences=("t1", "t2")):
    return build_sheet(
        source="cddpm_release", sequences=list(sequences), path=folder / "Train" / "ixi"
    )


def release_brats(folder: Path):
    return build_sheet(
        source="cddpm_release", sequences=["t2"], path=folder / "Test" / "Brats21", lesion="tumour"
    )


def bids_sheet(folder: Path, lesion="wmh", layout=None, sequences=("t1", "t2")):
    return build_sheet(
        source="bids",
        sequences=list(sequences),
        path=folder,
        lesion=lesion,
        same_grid=False,
        layout=layout,
    )


def csv_assignment(release: Path, prefix: str) -> dict[str, str]:
    """Subject key -> per-fold splits, read straight from the release's CSVs."""
    splits = release / "splits"
    out: dict[str, list[str]] = {}
    for k in range(2):
        for split in ("train", "val"):
            for path in pd.read_csv(splits / f"{prefix}_{split}_fold{k}.csv")["img_path"]:
                out.setdefault(subject_key(Path(path).name), ["?", "?"])[k] = split
    for path in pd.read_csv(splits / f"{prefix}_test.csv")["img_path"]:
        out[subject_key(Path(path).name)] = ["test"]
    return {key: ",".join(v) for key, v in out.items()}


# ---- cddpm_release ---------------------------------------------------------------------


def test_release_ixi_sheet_carries_the_release_folds(layouts, tmp_path):
    sheet = release_ixi(layouts["release"])
    table = sheet.table
    assert table["subject"].tolist() == [
        "sub-IXI012Guys1000",
        "sub-IXI013HH1001",
        "sub-IXI014IOP1002",
    ]
    assert table["site"].tolist() == ["Guys", "HH", "IOP"]
    # The fourth subject is listed in the splits but has no T2 file: skipped and listed.
    assert sheet.skipped == [("IXI015-Guys-1003", "no t2 image")]
    expected = csv_assignment(layouts["release"], "IXI")
    keys = [s.split("/")[-1] for s in table["source_id"]]
    assert table[RELEASE_SPLIT].tolist() == [expected[k] for k in keys]
    assert table[RELEASE_SPLIT].tolist() == ["test", "val,train", "train,val"]
    assert (table["seg"] == "").all()
    assert all(Path(p).is_file() and "/mask/" in p for p in table["brainmask_truth"])
    assert json.loads(table["metadata"][0]) == {"age": 30.0, "release_set": "Train/ixi"}
    write_sheet(table, tmp_path / "sheet.tsv")
    assert read_sheet(tmp_path / "sheet.tsv").equals(table)


def test_release_folds_decide_the_splits_not_the_seed(layouts):
    table = release_ixi(layouts["release"]).table
    splits = release_splits(
        dict(zip(table["subject"], table[RELEASE_SPLIT], strict=True)), n_folds=2, where="sheet"
    )
    check_splits(splits)
    got = {(r.subject, r.fold): r.split for r in splits.itertuples()}
    assert got == {
        ("sub-IXI012Guys1000", 0): "test",
        ("sub-IXI012Guys1000", 1): "test",
        ("sub-IXI013HH1001", 0): "val",
        ("sub-IXI013HH1001", 1): "train",
        ("sub-IXI014IOP1002", 0): "train",
        ("sub-IXI014IOP1002", 1): "val",
    }
    drawn = healthy_splits(table["subject"], n_folds=2, test_fraction=0.2, seed=3141)
    assert not drawn.equals(splits), "fixture must differ from the drawn split to test anything"
    with pytest.raises(InputError, match="the release has 2 folds"):
        release_splits(
            dict(zip(table["subject"], table[RELEASE_SPLIT], strict=True)), n_folds=5, where="s"
        )
    # A lesion set's single value holds for every fold.
    lesion = release_splits({"sub-a": "val", "sub-b": "test"}, n_folds=3, where="s")
    assert lesion.groupby("subject")["split"].agg(set).to_dict() == {
        "sub-a": {"val"},
        "sub-b": {"test"},
    }


def test_release_lesion_set(layouts):
    sheet = release_brats(layouts["release"])
    table = sheet.table
    assert table["subject"].tolist() == ["sub-Brats2100000", "sub-Brats2100001"]
    assert table[RELEASE_SPLIT].tolist() == ["val", "test"]
    assert (table["t1"] == "").all() and all(Path(p).is_file() for p in table["t2"])
    for path in table["seg"]:
        assert set(np.unique(np.asanyarray(nib.load(path).dataobj)).tolist()) == {0, 1}
    # The CSVs name T1 files (the reference rewrites them); this set has only t2/.
    with pytest.raises(InputError, match=r"Brats21: no t1/ folder; this set has \['t2'\]"):
        build_sheet(
            source="cddpm_release",
            sequences=["t1"],
            path=layouts["release"] / "Test" / "Brats21",
            lesion="tumour",
        )


def test_release_path_must_be_a_set_folder(layouts):
    with pytest.raises(InputError, match="expected a set folder of the cDDPM release"):
        build_sheet(source="cddpm_release", sequences=["t1"], path=layouts["release"])


def _rewrite_csv(path: Path, change) -> None:
    table = pd.read_csv(path, index_col=0)
    change(table).to_csv(path, index=True)


def _move_to(target: str):
    def change(folder: Path) -> None:
        splits = folder / "splits"
        source = pd.read_csv(splits / "IXI_train_fold0.csv", index_col=0)
        _rewrite_csv(splits / target, lambda t: pd.concat([t, source.iloc[:1]]))

    return change


def _fold_gap(folder: Path) -> None:
    for split in ("train", "val"):
        (folder / "splits" / f"IXI_{split}_fold1.csv").rename(
            folder / "splits" / f"IXI_{split}_fold2.csv"
        )


def _drop_from_fold1(folder: Path) -> None:
    _rewrite_csv(folder / "splits" / "IXI_train_fold1.csv", lambda t: t.iloc[:0])


def _bad_path(folder: Path) -> None:
    _rewrite_csv(
        folder / "splits" / "IXI_test.csv",
        lambda t: t.assign(img_path="/elsewhere/" + t["img_name"]),
    )


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_move_to("IXI_val_fold0.csv"), r"IXI_val_fold0\.csv: subject .* also in IXI_train_fold0"),
        (_move_to("IXI_test.csv"), r"is test in every fold and train in IXI_train_fold0"),
        (_fold_gap, r"folds \[0, 2\] of Train/ixi; expected _fold0 \.\.\. _fold1"),
        (_drop_from_fold1, r"is in no split CSV of fold\(s\) \[1\]"),
        (_bad_path, r"IXI_test\.csv: img_path '/elsewhere/.*' is not under Train/ or Test/"),
    ],
)
def test_bad_release_split_files_name_the_file(copy_of, breaker, message):
    folder = copy_of("release")
    breaker(folder)
    with pytest.raises(InputError, match=message):
        release_ixi(folder)


def test_release_without_splits_folder(copy_of):
    folder = copy_of("release")
    shutil.rmtree(folder / "splits")
    with pytest.raises(InputError, match=r"splits: missing; expected the release's split CSVs"):
        release_ixi(folder)


def test_release_subject_outside_the_splits_is_listed(copy_of):
    folder = copy_of("release")
    _rewrite_csv(folder / "splits" / "IXI_test.csv", lambda t: t.iloc[:0])
    sheet = release_ixi(folder)
    assert "sub-IXI012Guys1000" not in sheet.table["subject"].tolist()
    assert ("IXI012-Guys-1000", "not in the release's split CSVs") in sheet.skipped


RELEASE_FILES = {"image": "Brats21_00000_t2.nii.gz", "seg": "Brats21_00000_seg.nii.gz"}


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("image", "truncated"),
        ("image", "NaN"),
        ("seg", "truncated"),
        ("seg", "other grid"),
        ("seg", "empty mask"),
        ("seg", "unknown label"),
    ],
)
def test_bad_release_file_names_the_file(copy_of, kind, problem):
    folder = copy_of("release")
    target = first(folder / "Test" / "Brats21", RELEASE_FILES[kind])
    breaker, message = BAD[problem]
    breaker(target)
    with pytest.raises(InputError, match=message) as err:
        release_brats(folder)
    assert target.name in str(err.value)


def test_release_brain_mask_checked(copy_of):
    folder = copy_of("release")
    target = first(folder / "Test" / "Brats21", "Brats21_00001_mask.nii.gz")
    rewrite(target, lambda d, a: (np.zeros_like(d), a))
    with pytest.raises(InputError, match=r"Brats21_00001_mask\.nii\.gz: brain mask is empty"):
        release_brats(folder)
    rewrite(target, lambda d, a: (np.ones_like(d)[:-1], a))
    with pytest.raises(InputError, match=r"Brats21_00001_mask\.nii\.gz: grid"):
        release_brats(folder)


def test_release_lesion_subject_missing_a_file_is_an_error(copy_of):
    folder = copy_of("release")
    (folder / "Test" / "Brats21" / "seg" / "Brats21_00001_seg.nii.gz").unlink()
    with pytest.raises(
        InputError, match=r"seg: no file of subject 'Brats21_00001'.*Brats21_00001_seg"
    ):
        release_brats(folder)
    (folder / "Test" / "Brats21" / "t2" / "Brats21_00000_t2.nii.gz").unlink()
    with pytest.raises(InputError, match=r"t2: no file of subject 'Brats21_00000'"):
        release_brats(folder)


def test_read_release_splits_ignores_other_csvs(layouts):
    assignments, _ = read_release_splits(layouts["release"], "Test/ATLAS_v2")
    assert assignments == {"ATLAS_v2_00000": "val", "ATLAS_v2_00001": "test"}
    assert (layouts["release"] / "splits" / "avail_t2.csv").is_file()


# ---- bids ------------------------------------------------------------------------------


def test_bids_lesion_dataset(layouts):
    sheet = bids_sheet(layouts["bids"])
    table = sheet.table
    assert table["subject"].tolist() == ["sub-01", "sub-02"]
    assert table["source_id"].tolist() == ["sub-01/ses-1", "sub-02"]
    assert all("derivatives/lesions" in p for p in table["seg"])
    assert RELEASE_SPLIT not in table.columns
    assert sheet.skipped == [
        ("sub-03", f"no T2w image in {layouts['bids'] / 'sub-03' / 'ses-1' / 'anat'}"),
        ("sub-04/ses-1", "no lesion mask"),
    ]
    # T1 only: the subject without T2w is kept.
    assert bids_sheet(layouts["bids"], sequences=["t1"]).table["subject"].tolist() == [
        "sub-01",
        "sub-02",
        "sub-03",
    ]


def test_bids_healthy_dataset_needs_no_derivatives(layouts):
    sheet = bids_sheet(layouts["bids_healthy"], lesion="none")
    assert sheet.table["subject"].tolist() == ["sub-01", "sub-02"]
    assert (sheet.table["seg"] == "").all()
    assert not (layouts["bids_healthy"] / "derivatives").exists()
    # The lesion cohort read as healthy: its masks are not read.
    assert (bids_sheet(layouts["bids"], lesion="none").table["seg"] == "").all()


def test_bids_layout_options(copy_of):
    folder = copy_of("bids")
    lesions = folder / "derivatives" / "lesions"
    # A second pipeline with masks too: ambiguous until layout.derivatives picks one.
    shutil.copytree(lesions, folder / "derivatives" / "other")
    with pytest.raises(InputError, match="sub-01: 2 lesion masks match"):
        bids_sheet(folder)
    assert len(bids_sheet(folder, layout={"derivatives": "lesions"}).table) == 2
    with pytest.raises(InputError, match=r"derivatives/missing: missing; layout\.derivatives"):
        bids_sheet(folder, layout={"derivatives": "missing"})
    # Another naming: the default patterns find nothing, layout.mask finds them.
    shutil.rmtree(folder / "derivatives" / "other")
    for path in lesions.rglob("*_label-lesion_mask.nii.gz"):
        path.rename(path.with_name(path.name.replace("_label-lesion_mask", "_roi")))
    with pytest.raises(InputError, match="0 usable subject"):
        bids_sheet(folder)
    assert len(bids_sheet(folder, layout={"mask": "*_roi.nii.gz"}).table) == 2
    with pytest.raises(InputError, match=r"layout: \['masks'\] not understood by source 'bids'"):
        bids_sheet(folder, layout={"masks": "*"})


def test_bids_session_option(copy_of):
    folder = copy_of("bids")
    sheet = bids_sheet(folder, layout={"session": "ses-1"}, sequences=["t1"])
    assert sheet.table["subject"].tolist() == ["sub-01", "sub-03"]
    assert ("sub-02", "no ses-1 session") in sheet.skipped


def test_bids_label_values_from_the_layout(copy_of):
    folder = copy_of("bids")
    target = first(folder / "derivatives", "sub-01_*mask.nii.gz")
    rewrite(target, lambda d, a: (np.where(d > 0, 2, 0).astype(d.dtype), a))
    with pytest.raises(InputError, match=r"unknown label value\(s\) \[2\]"):
        bids_sheet(folder)
    layout = {"lesion_labels": [1, 2]}
    assert len(bids_sheet(folder, layout=layout).table) == 2
    labels = ADAPTERS["bids"].labels_for("wmh", layout)
    assert labels.lesion == (1, 2) and labels.ignore == ()


BIDS_FILES = {"image": "sub-01_ses-1_T1w.nii.gz", "seg": "sub-01_ses-1_label-lesion_mask.nii.gz"}


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("image", "truncated"),
        ("image", "NaN"),
        ("seg", "truncated"),
        ("seg", "other grid"),
        ("seg", "empty mask"),
        ("seg", "unknown label"),
    ],
)
def test_bad_bids_file_names_the_file(copy_of, kind, problem):
    folder = copy_of("bids")
    target = first(folder, BIDS_FILES[kind])
    breaker, message = BAD[problem]
    breaker(target)
    with pytest.raises(InputError, match=message) as err:
        bids_sheet(folder)
    assert target.name in str(err.value)


def test_bids_needs_subject_folders(tmp_path):
    with pytest.raises(InputError, match="no sub-<label> folders; expected a BIDS dataset"):
        bids_sheet(tmp_path)


# ---- per-dataset settings -------------------------------------------------------------


def study(tmp_path: Path) -> dict:
    config = tiny_config_for_other_datasets()
    config["datasets"] = {
        "ixi": {"source": "cddpm_release", "lesion": "none", "path": str(tmp_path)},
        "brats": {
            "source": "cddpm_release",
            "lesion": "tumour",
            "path": str(tmp_path),
            "preprocess": {"sequences": ["t2"]},
        },
        "own": {
            "source": "bids",
            "lesion": "ms",
            "path": str(tmp_path),
            "layout": {"derivatives": "lesions", "ignore_labels": [2]},
        },
        "own_healthy": {"source": "bids", "lesion": "none", "path": str(tmp_path)},
    }
    config["healthy_dataset"] = "ixi"
    config["splits"]["source"] = "release"
    return config


def test_settings_of_the_new_sources(tmp_path):
    from brainuad.config_checks import check_study_config

    config = study(tmp_path)
    check_study_config(config, str(ROOT / "config" / "schema.yaml"))
    check_datasets(config)
    release = dataset_preprocess(config, "brats")
    assert release["register"] is False
    assert release["skullstrip_method"] == "none"
    assert release["n4"] is False
    assert release["sequences"] == ["t2"]
    assert dataset_preprocess(config, "own")["coregister_sequences"] is True
    assert dataset_labels(config, "ixi") is None
    assert dataset_labels(config, "brats").lesion == (1,)
    assert dataset_labels(config, "own").ignore == (2,)
    assert dataset_labels(config, "own_healthy") is None


def test_layout_refused_for_sources_without_options(tmp_path):
    config = study(tmp_path)
    config["datasets"]["brats"]["layout"] = {"mask": "*"}
    with pytest.raises(ConfigError, match=r"datasets.brats.layout: \['mask'\] not understood"):
        check_datasets(config)


def test_paper_release_alternative_is_a_valid_study(tmp_path):
    """The commented cddpm_release block of config/paper.yaml, uncommented, passes every
    config check (with the set folders present)."""
    from brainuad.config_checks import check_study_config

    text = (ROOT / "config" / "paper.yaml").read_text().splitlines()
    start = text.index("# datasets:")
    block = [line.removeprefix("# ") for line in text[start : start + 6]]
    datasets = yaml.safe_load("\n".join(block))["datasets"]
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    config["datasets"] = datasets
    config["splits"]["source"] = "release"
    config["data_dir"] = str(tmp_path)
    for spec in datasets.values():
        (tmp_path / spec["path"]).mkdir(parents=True)
    check_study_config(config, str(ROOT / "config" / "schema.yaml"))
    assert {d["source"] for d in datasets.values()} == {"cddpm_release"}
    assert dataset_preprocess(config, "atlas")["sequences"] == ["t1"]
    assert dataset_preprocess(config, "ixi")["sequences"] == ["t1", "t2"]


def test_splits_source_decides_between_release_and_drawn_folds():
    from brainuad.slices.splits import dataset_splits

    subjects = ["sub-a", "sub-b", "sub-c", "sub-d", "sub-e"]
    splits = ["test", "val,train", "train,val", "train,val", "val,train"]
    release = dict(zip(subjects, splits, strict=True))
    options = {"n_folds": 2, "healthy_test_fraction": 0.2}
    kept = dataset_splits(
        subjects, release=release, healthy=True, options=options, seed=0, where="s"
    )
    assert kept.equals(release_splits(release, n_folds=2, where="s"))
    drawn = healthy_splits(subjects, n_folds=2, test_fraction=0.2, seed=0)
    assert not drawn.equals(kept)
    for source in ("auto", "release"):
        table = dataset_splits(
            subjects,
            release=release,
            healthy=True,
            options=options | {"source": source},
            seed=0,
            where="s",
        )
        assert table.equals(kept), source
    ignored = dataset_splits(
        subjects,
        release=release,
        healthy=True,
        options=options | {"source": "draw"},
        seed=0,
        where="s",
    )
    assert ignored.equals(drawn)
    # Without release folds: drawn under auto, an error naming the sheet under release.
    assert dataset_splits(
        subjects, release=None, healthy=True, options=options, seed=0, where="s"
    ).equals(drawn)
    with pytest.raises(InputError, match=r"sheet\.tsv: splits\.source is 'release'"):
        dataset_splits(
            subjects,
            release=None,
            healthy=True,
            options=options | {"source": "release"},
            seed=0,
            where="sheet.tsv",
        )
