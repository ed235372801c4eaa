"""Dataset adapters on small datasets in each real layout (brainuad.data.layout_fixtures):
discovery, label conventions, and the errors bad downloads give when the sheet is built."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from tiny_config import tiny_config_for_other_datasets

from brainuad.config import ConfigError
from brainuad.data.adapters import ADAPTERS
from brainuad.data.datasets import check_datasets, dataset_preprocess, dataset_sequences
from brainuad.data.layout_fixtures import WRITERS
from brainuad.data.sheet import SHEET_COLUMNS, build_sheet, read_sheet, write_sheet
from brainuad.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
# The sequences each layout is read in by the tests (reference first).
SEQUENCES = {
    "ixi": ["t1", "t2"],
    "brats2021": ["t2", "flair"],
    "atlas2": ["t1"],
    "wmh2017": ["t1", "flair"],
    "mslub": ["t2", "t1"],
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    folders = {}
    for source in SEQUENCES:
        WRITERS[source](base / source, n_subjects=3 if source == "ixi" else 2, seed=1)
        folders[source] = base / source
    return folders


def sheet_of(source: str, folder: Path) -> pd.DataFrame:
    return build_sheet(
        source=source,
        sequences=SEQUENCES[source],
        path=folder,
        same_grid=source != "ixi",
        lesion="none" if source == "ixi" else "lesion",
    ).table


@pytest.fixture
def copy_of(layouts, tmp_path):
    def copy(source: str) -> Path:
        target = tmp_path / source
        shutil.copytree(layouts[source], target)
        return target

    return copy


def test_ixi_skips_subject_without_t2_and_records_sites(layouts):
    sheet = build_sheet(source="ixi", sequences=["t1", "t2"], path=layouts["ixi"], same_grid=False)
    assert sheet.table["subject"].tolist() == ["sub-IXI012", "sub-IXI013"]
    assert sheet.table["site"].tolist() == ["Guys", "HH"]
    assert sheet.skipped == [("IXI014", "no t2 image")]
    assert (sheet.table["seg"] == "").all()
    # Asked for T1 only, the third subject is kept.
    assert len(build_sheet(source="ixi", sequences=["t1"], path=layouts["ixi"]).table) == 3


def test_ixi_t1_and_t2_grids_differ_so_same_grid_is_refused(layouts):
    with pytest.raises(InputError, match=r"IXI012-Guys-1000-T2\.nii\.gz: grid"):
        build_sheet(source="ixi", sequences=["t1", "t2"], path=layouts["ixi"], same_grid=True)


@pytest.mark.parametrize("source", ["brats2021", "atlas2", "wmh2017", "mslub"])
def test_lesion_layouts_give_a_valid_sheet(layouts, source, tmp_path):
    table = sheet_of(source, layouts[source])
    assert len(table) == 2
    assert list(table.columns) == list(SHEET_COLUMNS)
    for sequence in SEQUENCES[source]:
        assert all(Path(p).is_file() for p in table[sequence])
    assert all(Path(p).is_file() for p in table["seg"])
    write_sheet(table, tmp_path / "sheet.tsv")
    assert read_sheet(tmp_path / "sheet.tsv").equals(table)


def label_values(table: pd.DataFrame) -> set[int]:
    values = set()
    for path in table["seg"]:
        values |= set(np.unique(np.asanyarray(nib.load(path).dataobj)).astype(int).tolist())
    return values


def test_label_conventions(layouts):
    assert label_values(sheet_of("brats2021", layouts["brats2021"])) == {0, 1, 2, 4}
    assert ADAPTERS["brats2021"].labels.lesion == (1, 2, 4)
    assert label_values(sheet_of("wmh2017", layouts["wmh2017"])) == {0, 1, 2}
    assert ADAPTERS["wmh2017"].labels.lesion == (1,)
    assert ADAPTERS["wmh2017"].labels.ignore == (2,)
    assert label_values(sheet_of("atlas2", layouts["atlas2"])) == {0, 1}
    assert label_values(sheet_of("mslub", layouts["mslub"])) == {0, 1}


def test_sheet_passes_its_schema(layouts, tmp_path):
    from snakemake.utils import validate

    table = sheet_of("wmh2017", layouts["wmh2017"])
    validate(table, str(ROOT / "config" / "subjects.schema.yaml"))
    table.loc[0, "subject"] = "patient 1"
    with pytest.raises(Exception, match="patient 1"):
        validate(table, str(ROOT / "config" / "subjects.schema.yaml"))


# ---- bad downloads --------------------------------------------------------------------


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.rglob(pattern))[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite(path: Path, change) -> None:
    img = nib.load(str(path))
    data, affine = change(np.asanyarray(img.dataobj).copy(), img.affine.copy())
    changed = nib.Nifti1Image(data, affine, img.header)
    changed.header.set_data_dtype(data.dtype)  # NaN must not be cast away by an int16 header
    nib.save(changed, str(path))


def _zeros(d, a):
    return np.zeros_like(d), a


def _label_three(d, a):
    return np.where(d > 0, 3, 0).astype(d.dtype), a


def _nan(d, a):
    return np.where(d == d.max(), np.nan, d).astype(np.float32), a


def _crop(d, a):
    return d[:-2], a


BAD = {
    # problem: (how to break a file, expected message)
    "truncated": (truncate, "truncated or corrupt"),
    "other grid": (lambda p: rewrite(p, _crop), "grid .* differs"),
    "empty mask": (lambda p: rewrite(p, _zeros), "lesion mask is empty"),
    "unknown label": (lambda p: rewrite(p, _label_three), r"unknown label value\(s\) \[3\]"),
    "NaN": (lambda p: rewrite(p, _nan), "NaN"),
}

SEG_FILES = {
    "brats2021": "*_seg.nii.gz",
    "atlas2": "*lesion_mask.nii.gz",
    "wmh2017": "wmh.nii.gz",
    "mslub": "consensus_gt.nii.gz",
}
IMAGE_FILES = {
    "brats2021": "*_t2.nii.gz",
    "atlas2": "*_T1w.nii.gz",
    "wmh2017": "T1.nii.gz",
    "mslub": "T2W.nii.gz",
    "ixi": "*-T1.nii.gz",
}


@pytest.mark.parametrize("source", sorted(SEG_FILES))
@pytest.mark.parametrize("problem", ["truncated", "other grid", "empty mask", "unknown label"])
def test_bad_segmentation_names_the_file(copy_of, source, problem):
    folder = copy_of(source)
    target = first(folder, SEG_FILES[source])
    breaker, message = BAD[problem]
    breaker(target)
    with pytest.raises(InputError, match=message) as err:
        sheet_of(source, folder)
    assert target.name in str(err.value)


@pytest.mark.parametrize("source", sorted(IMAGE_FILES))
@pytest.mark.parametrize("problem", ["truncated", "NaN"])
def test_bad_image_names_the_file(copy_of, source, problem):
    folder = copy_of(source)
    target = first(folder, IMAGE_FILES[source])
    breaker, message = BAD[problem]
    breaker(target)
    with pytest.raises(InputError, match=message) as err:
        sheet_of(source, folder)
    assert target.name in str(err.value)


@pytest.mark.parametrize("source", ["brats2021", "atlas2", "wmh2017", "mslub"])
def test_missing_sequence_is_an_error_for_lesion_layouts(copy_of, source):
    folder = copy_of(source)
    target = first(folder, IMAGE_FILES[source])
    target.unlink()
    with pytest.raises(InputError, match=r"missing|no t2|no t1|expected exactly one") as err:
        sheet_of(source, folder)
    assert target.parent.name in str(err.value) or target.name in str(err.value)


def test_image_with_wrong_dimensionality(copy_of):
    folder = copy_of("brats2021")
    target = first(folder, "*_t2.nii.gz")
    rewrite(target, lambda d, a: (d[..., None].repeat(2, axis=3), a))
    with pytest.raises(InputError, match="expected a 3D volume"):
        sheet_of("brats2021", folder)


def test_mslub_accepts_the_repackaged_names(copy_of):
    folder = copy_of("mslub")
    for patient in folder.glob("patient*"):
        for old, new in (("T1W", "t1"), ("T2W", "t2"), ("FLAIR", "flair"), ("consensus_gt", "seg")):
            (patient / f"{old}.nii.gz").rename(patient / f"{patient.name}_{new}.nii.gz")
    assert len(sheet_of("mslub", folder)) == 2


def test_gzip_bomb_free_truncation_detected_even_when_header_reads(copy_of):
    # Half a gzip stream still gives a readable NIfTI header: only reading voxels finds it.
    folder = copy_of("atlas2")
    target = first(folder, "*_T1w.nii.gz")
    truncate(target)
    with gzip.open(target) as f:
        assert len(f.read(348)) == 348
    with pytest.raises(InputError, match="truncated"):
        sheet_of("atlas2", folder)


# ---- per-dataset settings -------------------------------------------------------------


def paper_like_config(tmp_path: Path) -> dict:
    config = tiny_config_for_other_datasets()
    config["datasets"] = {
        "ixi": {"source": "ixi", "lesion": "none", "path": str(tmp_path)},
        "brats": {"source": "brats2021", "lesion": "tumour", "path": str(tmp_path)},
        "atlas": {"source": "atlas2", "lesion": "stroke", "path": str(tmp_path)},
        "wmh": {
            "source": "wmh2017",
            "lesion": "wmh",
            "path": str(tmp_path),
            "preprocess": {"sequences": ["t1"], "skullstrip_method": "template"},
        },
    }
    config["healthy_dataset"] = "ixi"
    config["slices"]["sequences"] = ["t1", "t2"]
    return config


def test_dataset_preprocess_layers_adapter_defaults_and_own_choices(tmp_path):
    config = paper_like_config(tmp_path)
    check_datasets(config)
    assert dataset_preprocess(config, "brats")["skullstrip_method"] == "none"
    assert dataset_preprocess(config, "brats")["sequences"] == ["t1", "t2"]
    assert dataset_preprocess(config, "ixi")["coregister_sequences"] is True
    atlas = dataset_preprocess(config, "atlas")
    assert atlas["sequences"] == ["t1"] and atlas["register"] is False
    wmh = dataset_preprocess(config, "wmh")
    assert wmh["sequences"] == ["t1"] and wmh["skullstrip_method"] == "template"
    assert dataset_sequences(config, "ixi") == ["t1", "t2"]


def _atlas_t2(c):
    c["datasets"]["atlas"]["preprocess"] = {"sequences": ["t2"]}


def _hdbet_without_weights(c):
    c["datasets"]["wmh"]["preprocess"]["skullstrip_method"] = "hdbet"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_atlas_t2, "atlas.preprocess.sequences"),
        (lambda c: c["datasets"]["brats"].pop("path"), "datasets.brats.path"),
        (lambda c: c["datasets"]["ixi"].update(lesion="tumour"), "datasets.ixi.lesion"),
        (_hdbet_without_weights, "hdbet_weights"),
    ],
)
def test_check_datasets_names_the_key(tmp_path, change, message):
    config = paper_like_config(tmp_path)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_datasets(config)


# ---- label conventions in the slice file ----------------------------------------------


def test_slices_keep_lesion_sublabels_and_carry_the_ignore_mask(tmp_path):
    import h5py

    from brainuad.slices.extract import build_slice_file
    from brainuad.slices.hdf5 import SliceFile

    shape = (12, 12, 6)
    affine = np.eye(4)
    brain = np.zeros(shape, np.uint8)
    brain[2:10, 2:10, :] = 1
    seg = np.zeros(shape, np.uint8)
    seg[3:5, 3:5, 2] = 1  # WMH
    seg[7:9, 7:9, 2] = 2  # other pathology
    seg[3:5, 7:9, 3] = 4  # a label outside the convention is dropped from the lesion
    paths = {}
    for name, data in (("t1", brain * 1.0), ("brainmask", brain), ("seg", seg)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(paths[name]))
    out = tmp_path / "slices.h5"
    build_slice_file(
        out_path=out,
        subjects={"sub-1": paths},
        sequences=["t1"],
        size=12,
        min_brain_fraction=0.0,
        attrs={},
        lesion_labels=[1],
        ignore_labels=[2],
    )
    with h5py.File(out) as f:
        assert set(np.unique(f["seg"][:])) == {0, 1}
        assert int(f["ignore"][:].sum()) == 4
        assert int((f["ignore"][:] & (f["seg"][:] > 0)).sum()) == 0
    data = SliceFile(out).read(np.arange(len(SliceFile(out))))
    assert data["ignore"].sum() == 4
