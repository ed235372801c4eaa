"""Tests of slice extraction and the HDF5 slice file contract, on tiny synthetic volumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brainuad.errors import InputError
from brainuad.io.hdf5 import read_rows
from brainuad.io.nifti import save_nifti
from brainuad.slices.extract import build_slice_file, extract_subject_slices
from brainuad.slices.hdf5 import SliceDataset, SliceFile, SliceWriter

SHAPE = (40, 48, 40)  # R, A, S
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-40.0, -56.0, -30.0]
SEQUENCES = ["t1", "t2"]


def ellipsoid_brain() -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    centre = [(n - 1) / 2 for n in SHAPE]
    radii = (16.0, 20.0, 16.0)
    r2 = sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radii, strict=True))
    return (r2 <= 1.0).astype(np.uint8)


def lesion_seg(mask: np.ndarray) -> np.ndarray:
    """Two blobs with labels 1 and 2 (label values must survive resizing)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    seg = np.zeros(SHAPE, np.uint8)
    seg[(x - 14) ** 2 + (y - 26) ** 2 + (z - 20) ** 2 <= 16] = 1
    seg[(x - 26) ** 2 + (y - 20) ** 2 + (z - 22) ** 2 <= 9] = 2
    return seg * mask


def write_subject(
    folder: Path,
    mask: np.ndarray | None = None,
    seg: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Write t1, t2, brainmask, seg NIfTIs under ``folder``; return name -> path."""
    mask = ellipsoid_brain() if mask is None else mask
    seg = lesion_seg(mask) if seg is None else seg
    rng = np.random.default_rng(seed)
    files = {}
    for name in SEQUENCES:
        image = (rng.uniform(0.2, 0.8, SHAPE) * mask).astype(np.float32)
        files[name] = folder / f"{name}.nii.gz"
        save_nifti(image, AFFINE, files[name], dtype=np.float32)
    files["brainmask"] = folder / "brainmask.nii.gz"
    save_nifti(mask, AFFINE, files["brainmask"], dtype=np.uint8)
    files["seg"] = folder / "seg.nii.gz"
    save_nifti(seg, AFFINE, files["seg"], dtype=np.uint8)
    return files


def extract(files: dict[str, Path], **kwargs):
    options = {"sequences": SEQUENCES, "size": 32, "min_brain_fraction": 0.25, **kwargs}
    images = {k: v for k, v in files.items() if k not in ("brainmask", "seg")}
    return extract_subject_slices(
        images=images, brainmask=files["brainmask"], seg=files["seg"], **options
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cohort")
    subjects = {}
    for i, subject in enumerate(["sub-b", "sub-a"]):  # unsorted on purpose
        (root / subject).mkdir()
        seg = None if subject == "sub-a" else np.zeros(SHAPE, np.uint8)
        subjects[subject] = write_subject(root / subject, seg=seg, seed=i)
    return subjects


@pytest.fixture(scope="module")
def slice_file(cohort, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("slices") / "toy.h5"
    summary = build_slice_file(
        out_path=path,
        subjects=cohort,
        sequences=SEQUENCES,
        size=32,
        min_brain_fraction=0.25,
        attrs={"dataset": "toy", "preprocess": {"crop_shape": [40, 48, 40]}},
    )
    return path, summary


def test_slice_file_contract(slice_file):
    path, summary = slice_file
    with h5py.File(path, "r") as f:
        n = f["images"].shape[0]
        assert n == summary["n_slices"] > 0
        expected = {
            "images": ("float32", (n, 2, 32, 32), (1, 2, 32, 32)),
            "brainmask": ("uint8", (n, 32, 32), (1, 32, 32)),
            "seg": ("uint8", (n, 32, 32), (1, 32, 32)),
        }
        for name, (dtype, shape, chunks) in expected.items():
            assert f[name].dtype == np.dtype(dtype), name
            assert f[name].shape == shape, name
            assert f[name].chunks == chunks, name
            assert f[name].compression == "lzf", name
        assert f["label"].dtype == np.uint8 and f["label"].shape == (n,)
        assert np.issubdtype(f["slice_index"].dtype, np.integer)
        assert f["slice_index"].shape == (n,)
        assert json.loads(f.attrs["sequences"]) == SEQUENCES
        assert f.attrs["dataset"] == "toy"
        assert json.loads(f.attrs["preprocess"]) == {"crop_shape": [40, 48, 40]}
        assert f.attrs["slice_size"] == 32
        assert f.attrs["min_brain_fraction"] == 0.25
        assert "brainuad_version" in f.attrs
        seg = f["seg"][:]
        np.testing.assert_array_equal(f["label"][:], seg.reshape(n, -1).any(axis=1))
        subjects = f["subject"].asstr()[:]
        slice_index = f["slice_index"][:]
        images, brainmask = f["images"][:], f["brainmask"][:]
    # Subjects in sorted order, each block with increasing axial indices.
    assert list(dict.fromkeys(subjects)) == ["sub-a", "sub-b"]
    for subject, counts in summary["per_subject"].items():
        rows = subjects == subject
        assert rows.sum() == counts["n_slices"]
        assert np.all(np.diff(slice_index[rows]) > 0)
    assert summary["per_subject"]["sub-b"]["n_lesion_slices"] == 0
    assert summary["n_lesion_slices"] == summary["per_subject"]["sub-a"]["n_lesion_slices"] > 0
    assert set(np.unique(brainmask)) <= {0, 1}
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.all(images[np.broadcast_to(brainmask[:, None] == 0, images.shape)] == 0)
    assert set(np.unique(seg)) == {0, 1, 2}


def test_brain_fraction_rule_matches_hand_count(tmp_path):
    # A layered "brain": slices 10-29 have area 480, 5-9 and 30-34 area 240 (= 0.5 x max),
    # 3-4 and 35-36 area 96 (= 0.2 x max); the rest are empty.
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:30, 12:36, 10:30] = 1
    mask[15:25, 12:36, 5:10] = 1
    mask[15:25, 12:36, 30:35] = 1
    mask[18:22, 12:36, 3:5] = 1
    mask[18:22, 12:36, 35:37] = 1
    files = write_subject(tmp_path, mask=mask, seg=np.zeros(SHAPE, np.uint8))
    expected = {
        0.0: list(range(3, 37)),
        0.2: list(range(3, 37)),
        0.25: list(range(5, 35)),
        0.5: list(range(5, 35)),
        0.6: list(range(10, 30)),
        1.0: list(range(10, 30)),
    }
    for fraction, kept in expected.items():
        slices = extract(files, min_brain_fraction=fraction)
        assert slices.slice_index.tolist() == kept, fraction
        assert slices.images.shape[0] == len(kept)


@pytest.mark.parametrize("size", [20, 48, 64])
def test_resize_to_configured_size(cohort, size):
    slices = extract(cohort["sub-a"], size=size)
    n = len(slices)
    assert slices.images.shape == (n, 2, size, size) and slices.images.dtype == np.float32
    assert slices.brainmask.shape == (n, size, size) and slices.brainmask.dtype == np.uint8
    assert slices.seg.shape == (n, size, size) and slices.seg.dtype == np.uint8
    assert set(np.unique(slices.seg)) == {0, 1, 2}
    assert set(np.unique(slices.brainmask)) == {0, 1}


def test_orientation_anterior_up_left_on_left(tmp_path):
    # The brain fills the whole volume; a marker sits at the most anterior row, patient's
    # left (low R index). With size 48 (= padded square of 48 x 40) nothing is resampled.
    mask = np.ones(SHAPE, np.uint8)
    seg = np.zeros(SHAPE, np.uint8)
    seg[2, 45, 20] = 3  # x = 2 (left), y = 45 (anterior), z = 20
    files = write_subject(tmp_path, mask=mask, seg=seg)
    slices = extract(files, size=48, min_brain_fraction=0.0)
    row = int(np.flatnonzero(slices.slice_index == 20)[0])
    rows, cols = np.nonzero(slices.seg[row])
    # Rows: anterior first, so y = 45 -> row 47 - 45 = 2; columns padded by 4 on the left.
    assert (rows.tolist(), cols.tolist()) == ([2], [2 + 4])
    assert slices.seg[row, 2, 6] == 3
    # The padding columns are outside the brain.
    assert slices.brainmask[row, :, :4].sum() == 0 and slices.brainmask[row, :, 4:44].all()


def test_slice_dataset_reads_rows_lazily(slice_file, monkeypatch):
    path, _ = slice_file
    with h5py.File(path, "r") as f:
        images, segs, labels = f["images"][:], f["seg"][:], f["label"][:]
    selections = []
    original = h5py.Dataset.__getitem__

    def spy(self, args, *rest, **kwargs):
        selections.append((self.name, args))
        return original(self, args, *rest, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    dataset = SliceDataset(path)
    selections.clear()  # SliceFile reads the small per-row arrays when it opens
    loader = DataLoader(dataset, batch_size=1, num_workers=0, shuffle=False)
    for i, item in enumerate(loader):
        assert item["image"].shape == (1, 2, 32, 32) and item["image"].dtype == torch.float32
        assert item["brainmask"].shape == (1, 1, 32, 32)
        assert item["brainmask"].dtype == torch.float32
        assert item["seg"].shape == (1, 32, 32) and item["seg"].dtype == torch.uint8
        np.testing.assert_array_equal(item["image"][0].numpy(), images[i])
        np.testing.assert_array_equal(item["seg"][0].numpy(), segs[i])
        assert int(item["label"][0]) == labels[i] and int(item["row"][0]) == i
    image_reads = [args for name, args in selections if name == "/images"]
    assert len(image_reads) == len(dataset)
    assert all(isinstance(args, int) for args in image_reads)


def test_read_rows_any_order_and_repeats(tmp_path):
    data = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    with h5py.File(tmp_path / "rows.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(1, 3))
    with h5py.File(tmp_path / "rows.h5", "r") as f:
        for rows in ([4, 0, 4, 2], [5, 5], [1, 2, 3], []):
            np.testing.assert_array_equal(read_rows(f["x"], rows), data[rows].reshape(-1, 3))


def test_slice_file_read_any_order_and_repeats(slice_file):
    path, _ = slice_file
    with h5py.File(path, "r") as f:
        full = {name: f[name][:] for name in ("images", "brainmask", "seg", "slice_index")}
        subjects = f["subject"].asstr()[:]
    rows = [len(subjects) - 1, 0, 3, 0]
    out = SliceFile(path).read(rows)
    for name, values in full.items():
        np.testing.assert_array_equal(out[name], values[rows], err_msg=name)
    np.testing.assert_array_equal(out["subject"], subjects[rows])
    np.testing.assert_array_equal(out["row"], rows)


def test_slice_file_module_imports_without_torch():
    # The reporting environment has no torch; it reads slice files through SliceFile.
    code = "import sys; sys.modules['torch'] = None; import brainuad.slices.hdf5"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reserved_attrs_refused_before_any_file(tmp_path, cohort):
    out = tmp_path / "x.h5"
    with pytest.raises(InputError, match=r"x\.h5: attrs \['sequences'\] are reserved"):
        SliceWriter(out, sequences=["t1"], height=8, width=8, attrs={"sequences": "[]"})
    with pytest.raises(InputError, match="contract_version"):
        build_slice_file(
            out_path=out,
            subjects=cohort,
            sequences=["t1"],
            size=16,
            min_brain_fraction=0.25,
            attrs={"contract_version": 2},
        )
    assert list(tmp_path.iterdir()) == []  # no temporary left behind either


def test_slice_dataset_subject_selection(slice_file):
    path, summary = slice_file
    dataset = SliceDataset(path, subjects=["sub-b"])
    assert len(dataset) == summary["per_subject"]["sub-b"]["n_slices"]
    slices = SliceFile(path)
    assert set(slices.subjects[dataset.rows]) == {"sub-b"}
    with pytest.raises(InputError, match="sub-zzz"):
        SliceDataset(path, subjects=["sub-zzz"])


def test_deterministic_output(cohort, slice_file, tmp_path):
    path, summary = slice_file
    reordered = dict(sorted(cohort.items()))
    again = build_slice_file(
        out_path=tmp_path / "again.h5",
        subjects=reordered,
        sequences=SEQUENCES,
        size=32,
        min_brain_fraction=0.25,
        attrs={"dataset": "toy"},
    )
    assert again == summary
    with h5py.File(path, "r") as a, h5py.File(tmp_path / "again.h5", "r") as b:
        for name in ("images", "brainmask", "seg", "label", "slice_index"):
            np.testing.assert_array_equal(a[name][:], b[name][:])


def test_grid_mismatch_names_file(tmp_path):
    files = write_subject(tmp_path)
    save_nifti(np.zeros((40, 48, 38), np.uint8), AFFINE, files["seg"], dtype=np.uint8)
    with pytest.raises(InputError, match=str(files["seg"])):
        extract(files)
    shifted = AFFINE.copy()
    shifted[0, 3] += 4.0
    save_nifti(np.zeros(SHAPE, np.float32), shifted, files["t2"], dtype=np.float32)
    with pytest.raises(InputError, match=str(files["t2"])):
        extract(files)


def test_missing_sequence_and_files(tmp_path, cohort):
    files = dict(cohort["sub-a"])
    del files["t2"]
    with pytest.raises(InputError, match="t2"):
        extract(files)
    out = tmp_path / "broken.h5"
    subjects = {"sub-a": cohort["sub-a"], "sub-c": {k: v for k, v in files.items() if k != "seg"}}
    with pytest.raises(InputError, match=r"sub-c.*seg"):
        build_slice_file(
            out_path=out,
            subjects=subjects,
            sequences=["t1"],
            size=16,
            min_brain_fraction=0.25,
            attrs={},
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []  # atomic: nothing left behind
    with pytest.raises(InputError, match="does not exist"):
        extract({**cohort["sub-a"], "t1": tmp_path / "nope.nii.gz"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_brain_fraction": 1.5}, "min_brain_fraction"),
        ({"size": 0}, "size"),
        ({"sequences": []}, "sequences"),
    ],
)
def test_invalid_arguments(cohort, kwargs, match):
    with pytest.raises(InputError, match=match):
        extract(cohort["sub-a"], **kwargs)


def test_empty_brainmask(tmp_path):
    files = write_subject(tmp_path, mask=np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match="brain mask is empty"):
        extract(files)
