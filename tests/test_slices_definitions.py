"""The slice file against its documented contract (module docstring of
``brainuad.slices.hdf5``): dtypes, chunking, the slice label rule (``>= min_lesion_pixels``
lesion pixels), binarised masks, refused inputs, and the readers' row, channel and part
bookkeeping, on tiny hand-made slices."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest

from brainuad.errors import InputError
from brainuad.slices.hdf5 import (
    CONTRACT_VERSION,
    ConcatSliceDataset,
    SliceDataset,
    SliceFile,
    SliceWriter,
)

H, W = 8, 6


def _subject(n, seed, lesion_pixels):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 2, H, W)).astype(np.float64)
    brain = np.zeros((n, H, W), np.uint8)
    brain[:, 1:7, 1:5] = 2  # any non-zero value is brain
    seg = np.zeros((n, H, W), np.uint8)
    for i, k in enumerate(lesion_pixels):
        seg[i].flat[:k] = 2  # lesion label values are kept
    return images, brain, seg


@pytest.fixture
def slice_path(tmp_path):
    path = tmp_path / "s.h5"
    with SliceWriter(
        path,
        sequences=["t1", "t2"],
        height=H,
        width=W,
        attrs={"dataset": "toy", "spacing": [1.0, 2.0], "n": 3},
        min_lesion_pixels=3,
        with_ignore=True,
    ) as writer:
        for subject, seed, pixels, index in (
            ("b", 0, [0, 2, 3], [4, 5, 6]),
            ("a", 1, [5, 0], [10, 11]),
        ):
            images, brain, seg = _subject(len(pixels), seed, pixels)
            ignore = (seg > 0).astype(np.uint8) * 7
            writer.append_subject(subject, images, brain, seg, np.array(index), ignore=ignore)
    return path


def test_writer_follows_the_contract(slice_path):
    with h5py.File(slice_path, "r") as f:
        assert f["images"].dtype == np.float32 and f["images"].shape == (5, 2, H, W)
        assert f["images"].chunks == (1, 2, H, W) and f["images"].compression == "lzf"
        for name in ("brainmask", "seg", "ignore"):
            assert f[name].dtype == np.uint8 and f[name].chunks == (1, H, W)
            assert f[name].compression == "lzf"
        assert f["label"].dtype == np.uint8 and f["slice_index"].dtype == np.int32
        for name in ("label", "slice_index", "subject"):  # 1-D columns: larger chunks
            assert f[name].chunks == (1024,), name
        # label: at least min_lesion_pixels (3) lesion pixels
        assert f["label"][:].tolist() == [0, 0, 1, 1, 0]
        assert set(np.unique(f["brainmask"][:])) == {0, 1}
        assert set(np.unique(f["ignore"][:])) == {0, 1}
        assert f["seg"][:].max() == 2  # labels kept as they are
        assert f["slice_index"][:].tolist() == [4, 5, 6, 10, 11]
        assert f["subject"].asstr()[:].tolist() == ["b", "b", "b", "a", "a"]
        assert json.loads(f.attrs["sequences"]) == ["t1", "t2"]
        assert f.attrs["contract_version"] == CONTRACT_VERSION
        assert f.attrs["min_lesion_pixels"] == 3
        assert f.attrs["dataset"] == "toy" and f.attrs["n"] == 3
        assert json.loads(f.attrs["spacing"]) == [1.0, 2.0]
    images, _, _ = _subject(3, 0, [0, 2, 3])
    np.testing.assert_array_equal(
        SliceFile(slice_path).read([0, 1, 2])["images"], images.astype(np.float32)
    )


def test_default_label_is_any_lesion_pixel(tmp_path):
    path = tmp_path / "d.h5"
    with SliceWriter(path, sequences=["t2"], height=H, width=W) as writer:
        images, brain, seg = _subject(3, 0, [0, 1, 4])
        writer.append_subject("s", images[:, :1], brain, seg, np.arange(3))
    slices = SliceFile(path)
    assert slices.labels.tolist() == [0, 1, 1]
    assert slices.attrs["min_lesion_pixels"] == 1
    assert "ignore" not in slices.read([0])


@pytest.mark.parametrize("bad", [0, 1.5, -2])
def test_writer_refuses_bad_min_lesion_pixels(tmp_path, bad):
    with pytest.raises(InputError, match=r"slices.min_lesion_pixels: .* expected an integer ≥ 1"):
        SliceWriter(tmp_path / "x.h5", sequences=["t2"], height=H, width=W, min_lesion_pixels=bad)
    assert not (tmp_path / "x.h5").exists()


def test_writer_refuses_misfit_arrays_and_writes_nothing_on_error(tmp_path):
    path = tmp_path / "w.h5"
    images, brain, seg = _subject(2, 0, [0, 0])
    with pytest.raises(InputError, match=r"attrs \['contract_version', 'sequences'\] are reserved"):
        SliceWriter(
            path,
            sequences=["a", "b"],
            height=H,
            width=W,
            attrs={"sequences": 1, "contract_version": 2},
        )
    cases = [
        (
            (images[:, :1], brain, seg, None),
            r"s: images shape \(2, 1, 8, 6\), expected \(2, 2, 8, 6\)",
        ),
        (
            (images, brain[:, :4], seg, None),
            r"s: brainmask \(2, 4, 6\) / seg \(2, 8, 6\) do not match",
        ),
        ((images, brain, seg[:1], None), r"brainmask \(2, 8, 6\) / seg \(1, 8, 6\)"),
        (
            (images, brain, seg, seg),
            r"ignore mask \(2, 8, 6\) does not fit a writer with_ignore=False",
        ),
    ]
    for args, match in cases:
        with (
            pytest.raises(ValueError, match=match),
            SliceWriter(path, sequences=["a", "b"], height=H, width=W) as writer,
        ):
            writer.append_subject("s", *args[:3], np.arange(2), ignore=args[3])
        assert not path.exists()
    for ignore in (None, seg[:, :4]):
        with (
            pytest.raises(ValueError, match="does not fit a writer with_ignore=True"),
            SliceWriter(path, sequences=["a", "b"], height=H, width=W, with_ignore=True) as w,
        ):
            w.append_subject("s", images, brain, seg, np.arange(2), ignore=ignore)
    assert list(tmp_path.iterdir()) == []


def test_slice_file_reads_rows_channels_and_subjects(slice_path):
    slices = SliceFile(slice_path)
    assert len(slices) == 5 and slices.shape == (5, 2, H, W)
    assert slices.sequences == ["t1", "t2"]
    assert slices.channel_indices(None) == [0, 1]
    assert slices.channel_indices(["t2", "t1"]) == [1, 0]
    for bad in (["t1", "flair"], []):
        with pytest.raises(
            InputError, match=r"s.h5: sequences .* requested, the file holds \['t1', 't2'\]"
        ):
            slices.channel_indices(bad)
    assert slices.rows_for_subjects(["a"]).tolist() == [3, 4]
    assert slices.rows_for_subjects(["a", "b"]).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match=r"subjects not in slice file: \['c'\]"):
        slices.rows_for_subjects(["a", "c"])
    data = slices.read([4, 0, 4])
    assert data["row"].tolist() == [4, 0, 4]
    assert data["subject"].tolist() == ["a", "b", "a"]
    assert data["slice_index"].tolist() == [11, 4, 11]
    assert data["label"].tolist() == [0, 0, 0]
    assert data["ignore"].shape == (3, H, W)
    np.testing.assert_array_equal(data["seg"][1], slices.read([0])["seg"][0])
    _ = slices.file
    clone = pickle.loads(pickle.dumps(slices))  # workers open their own handle
    assert clone._file is None and clone.read([1])["row"].tolist() == [1]
    slices.close()
    assert slices._file is None


def test_slice_file_refuses_other_files(tmp_path, slice_path):
    missing = tmp_path / "m.h5"
    with h5py.File(missing, "w") as f:
        f.create_dataset("images", data=np.zeros((1, 1, 2, 2)))
    expected = (
        r"m\.h5: not a readable slice file \(HDF5, brainuad\.slices\.hdf5\) "
        r"\(missing \[.attrs\[.sequences.\]., 'brainmask', 'label'"
    )
    with pytest.raises(InputError, match=expected):
        SliceFile(missing)
    with h5py.File(slice_path, "a") as f:
        f.attrs["contract_version"] = CONTRACT_VERSION + 1
    with pytest.raises(
        InputError,
        match=rf"slice file \(HDF5, brainuad\.slices\.hdf5\) \(contract_version "
        rf"{CONTRACT_VERSION + 1}, this version reads",
    ):
        SliceFile(slice_path)
    text = tmp_path / "t.h5"
    text.write_text("not HDF5")
    with pytest.raises(InputError, match=r"t\.h5: not a readable slice file \(HDF5, brainuad"):
        SliceFile(text)


def test_slice_dataset_items_and_selections(slice_path):
    torch = pytest.importorskip("torch")
    everything = SliceDataset(slice_path)
    assert len(everything) == 5 and everything.rows.tolist() == [0, 1, 2, 3, 4]
    by_subject = SliceDataset(slice_path, subjects=["a"], sequences=["t2"])
    assert by_subject.rows.tolist() == [3, 4] and by_subject.subjects.tolist() == ["a", "a"]
    assert by_subject.labels.tolist() == [1, 0]
    item = by_subject[0]
    raw = SliceFile(slice_path).read([3])
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, H, W)
    np.testing.assert_array_equal(item["image"].numpy()[0], raw["images"][0, 1])
    assert item["brainmask"].dtype == torch.float32 and item["brainmask"].shape == (1, H, W)
    np.testing.assert_array_equal(item["brainmask"].numpy()[0], raw["brainmask"][0])
    assert item["seg"].dtype == torch.uint8 and item["seg"].shape == (H, W)
    assert item["label"] == 1 and isinstance(item["label"], int) and item["row"] == 3
    by_rows = SliceDataset(slice_path, subjects=["a"], rows=np.array([2, 0]))
    assert by_rows.rows.tolist() == [2, 0] and by_rows[1]["row"] == 0
    same = SliceDataset(slice_path, size=W)
    assert same.size is None
    resized = SliceDataset(slice_path, size=4)[2]
    assert resized["image"].shape == (2, 4, 4) and resized["brainmask"].shape == (1, 4, 4)
    assert resized["seg"].shape == (4, 4)
    assert set(torch.unique(resized["brainmask"]).tolist()) <= {0.0, 1.0}


def test_concatenated_datasets_index_across_parts(slice_path):
    pytest.importorskip("torch")
    first = SliceDataset(slice_path, subjects=["b"])
    second = SliceDataset(slice_path, subjects=["a"])
    both = ConcatSliceDataset([first, second], ["ixi", "brats"])
    assert len(both) == 5
    assert both.subjects.tolist() == ["ixi/b"] * 3 + ["brats/a"] * 2
    assert both.labels.tolist() == [0, 0, 1, 1, 0]
    assert [both[i]["row"] for i in range(5)] == [0, 1, 2, 3, 4]
    message = r"^ConcatSliceDataset: expected one name per part, at least one part$"
    with pytest.raises(InputError, match=message):
        ConcatSliceDataset([first], ["a", "b"])
    with pytest.raises(InputError, match=message):
        ConcatSliceDataset([], [])


# --- extraction: hand-made RAS volumes -------------------------------------------------------

X, Y, Z = 6, 3, 5  # R, A, S


def _volumes(tmp_path, *, seg_values=None, seg_dtype=np.uint8, affine=None):
    """A RAS volume whose value encodes its voxel, a brain of known area per axial slice."""
    from brainuad.io.nifti import save_nifti

    affine = np.eye(4) if affine is None else affine
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    image = (100 * z + 10 * y + x + 1).astype(np.float32)
    mask = np.zeros((X, Y, Z), np.uint8)
    mask[:, :, 1] = 1  # area 18 (the largest)
    mask[:3, :3, 2] = 1  # area 9: exactly half
    mask[:2, :3, 3] = 1  # area 6: a third
    seg = np.zeros((X, Y, Z), np.uint8) if seg_values is None else seg_values
    files = {"t1": tmp_path / "t1.nii.gz", "t2": tmp_path / "t2.nii.gz"}
    save_nifti(image, affine, files["t1"], dtype=np.float32)
    save_nifti(-image, affine, files["t2"], dtype=np.float32)
    files["brainmask"] = tmp_path / "mask.nii.gz"
    save_nifti(mask, affine, files["brainmask"], dtype=np.uint8)
    files["seg"] = tmp_path / "seg.nii.gz"
    save_nifti(seg, affine, files["seg"], dtype=seg_dtype)
    return files, image, mask


def _extract(files, **kwargs):
    from brainuad.slices.extract import extract_subject_slices

    options = {"sequences": ["t2", "t1"], "size": 6, "min_brain_fraction": 0.5, **kwargs}
    return extract_subject_slices(
        images={"t1": files["t1"], "t2": files["t2"]},
        brainmask=files["brainmask"],
        seg=files["seg"],
        **options,
    )


def test_extraction_keeps_orients_and_pads_by_hand(tmp_path):
    files, image, mask = _volumes(tmp_path)
    out = _extract(files)
    assert out.slice_index.tolist() == [1, 2]  # area >= half of the largest; 0 never
    assert out.slice_index.dtype == np.int32 and len(out) == 2
    assert out.images.shape == (2, 2, 6, 6) and out.images.dtype == np.float32
    # Y = 3 rows padded to 6: one row above, two below; rows run anterior (high y) first,
    # columns left to right (x)
    for i, k in enumerate((1, 2)):
        for r in range(3):
            for c in range(X):
                inside = mask[c, 2 - r, k] > 0
                expected = image[c, 2 - r, k] if inside else 0.0
                assert out.images[i, 1, 1 + r, c] == expected  # t1, second channel
                assert out.images[i, 0, 1 + r, c] == -expected  # t2 first, as asked
                assert out.brainmask[i, 1 + r, c] == inside
        assert not out.brainmask[i, 0].any() and not out.brainmask[i, 4:].any()
    assert out.ignore is None
    kept = _extract(files, min_brain_fraction=0.3)
    assert kept.slice_index.tolist() == [1, 2, 3]
    everything = _extract(files, min_brain_fraction=0.0)
    assert everything.slice_index.tolist() == [1, 2, 3]  # slices without brain: dropped


def test_extraction_label_conventions_and_resizing(tmp_path):
    seg = np.zeros((X, Y, Z), np.uint8)
    seg[0, 0, 1], seg[1, 0, 1], seg[2, 0, 1], seg[3, 0, 1] = 1, 2, 4, 3
    files, _, _ = _volumes(tmp_path, seg_values=seg)
    out = _extract(files, lesion_labels=[1, 4], ignore_labels=[2])
    row = out.seg[0, 3]  # y = 0 is the posterior row: 1 + 2
    assert row[:4].tolist() == [1, 0, 4, 0]  # 2 (ignored) and 3 (not a lesion) dropped
    assert out.ignore[0, 3, :4].tolist() == [0, 1, 0, 0]
    assert out.ignore.dtype == np.uint8
    every = _extract(files)
    assert every.seg[0, 3, :4].tolist() == [1, 2, 4, 3]
    big = _extract(files, size=12)
    assert big.images.shape == (2, 2, 12, 12)
    assert set(np.unique(big.seg)) == {0, 1, 2, 3, 4}  # nearest: label values preserved
    assert set(np.unique(big.brainmask)) == {0, 1}
    assert not big.images[:, :, big.brainmask[0] == 0][0].any()  # 0 outside the brain


def test_extraction_refuses_bad_inputs(tmp_path):
    from brainuad.slices.extract import extract_subject_slices

    files, _, _ = _volumes(tmp_path)
    with pytest.raises(InputError, match="sequences: expected at least one sequence name"):
        _extract(files, sequences=[])
    with pytest.raises(InputError, match=r"images: missing sequence\(s\) \['flair'\]"):
        _extract(files, sequences=["t1", "flair"])
    for size in (0, 2.5):
        with pytest.raises(InputError, match="size: expected a positive integer"):
            _extract(files, size=size)
    for fraction in (-0.1, 1.1):
        with pytest.raises(InputError, match=r"min_brain_fraction: expected a value in \[0, 1\]"):
            _extract(files, min_brain_fraction=fraction)
    floats = np.zeros((X, Y, Z), np.float32)
    floats[0, 0, 1] = 1.5
    (tmp_path / "f").mkdir()
    bad, _, _ = _volumes(tmp_path / "f", seg_values=floats, seg_dtype=np.float32)
    with pytest.raises(InputError, match=r"seg.nii.gz: segmentation has non-integer values"):
        _extract(bad)
    big = np.zeros((X, Y, Z), np.int16)
    big[0, 0, 1] = 300
    (tmp_path / "b").mkdir()
    bad, _, _ = _volumes(tmp_path / "b", seg_values=big, seg_dtype=np.int16)
    with pytest.raises(InputError, match=r"segmentation values span 0..300, expected 0..255"):
        _extract(bad)
    from brainuad.io.nifti import save_nifti

    save_nifti(np.zeros((X, Y, Z), np.uint8), np.eye(4), files["brainmask"], dtype=np.uint8)
    with pytest.raises(InputError, match=r"mask.nii.gz: brain mask is empty"):
        extract_subject_slices(
            images={"t1": files["t1"]},
            brainmask=files["brainmask"],
            seg=files["seg"],
            sequences=["t1"],
            size=6,
            min_brain_fraction=0.5,
        )


def test_build_slice_file_records_settings_and_counts(tmp_path):
    from brainuad.slices.extract import SLICE_ORIENTATION, build_slice_file

    seg = np.zeros((X, Y, Z), np.uint8)
    seg[:2, :, 1] = 1  # 6 lesion pixels on slice 1, none on slice 2
    subjects = {}
    for name in ("s2", "s1"):
        (tmp_path / name).mkdir()
        files, _, _ = _volumes(tmp_path / name, seg_values=seg)
        subjects[name] = files
    out = tmp_path / "slices.h5"
    summary = build_slice_file(
        out_path=out,
        subjects=subjects,
        sequences=["t1"],
        size=6,
        min_brain_fraction=0.5,
        attrs={"dataset": "toy"},
        min_lesion_pixels=7,
        ignore_labels=[9],
    )
    assert summary == {
        "n_subjects": 2,
        "n_slices": 4,
        "n_lesion_slices": 0,  # 6 < 7 lesion pixels
        "per_subject": {
            "s1": {"n_slices": 2, "n_lesion_slices": 0},
            "s2": {"n_slices": 2, "n_lesion_slices": 0},
        },
    }
    slices = SliceFile(out)
    assert slices.subjects.tolist() == ["s1", "s1", "s2", "s2"]
    assert slices.attrs["slice_size"] == 6 and slices.attrs["min_brain_fraction"] == 0.5
    assert slices.attrs["slice_orientation"] == SLICE_ORIENTATION
    assert slices.attrs["dataset"] == "toy" and "brainuad_version" in slices.attrs
    assert "ignore" in slices.read([0])
    low = build_slice_file(
        out_path=tmp_path / "low.h5",
        subjects=subjects,
        sequences=["t1"],
        size=6,
        min_brain_fraction=0.5,
        attrs={},
    )
    assert low["n_lesion_slices"] == 2 and low["per_subject"]["s1"]["n_lesion_slices"] == 1
    with pytest.raises(InputError, match="no subjects given for the slice file"):
        build_slice_file(
            out_path=out, subjects={}, sequences=["t1"], size=6, min_brain_fraction=0.5, attrs={}
        )
    with pytest.raises(InputError, match=r"subject s1: missing \['seg'\]"):
        build_slice_file(
            out_path=tmp_path / "x.h5",
            subjects={"s1": {"t1": subjects["s1"]["t1"], "brainmask": subjects["s1"]["brainmask"]}},
            sequences=["t1"],
            size=6,
            min_brain_fraction=0.5,
            attrs={},
        )


def test_slice_voxel_spacing_is_the_padded_side_over_the_size():
    """A slice of an (R, A) = (40, 48) grid at 1.5 mm is padded to 48 × 48 and resized to
    32 px: a pixel spans 48 · 1.5 / 32 = 2.25 mm; slices stay 1.5 mm apart. The larger
    in-plane side decides, whichever axis it is; the third (slice) axis never does."""
    from brainuad.slices.extract import slice_voxel_spacing

    spacing = slice_voxel_spacing(resolution_mm=1.5, volume_shape=(40, 48, 40), size=32)
    assert spacing == (1.5, 2.25, 2.25) and all(type(v) is float for v in spacing)
    assert slice_voxel_spacing(resolution_mm=2, volume_shape=(60, 48, 90), size=32) == (
        2.0,
        3.75,
        3.75,
    )
    assert slice_voxel_spacing(resolution_mm=1, volume_shape=(8, 8, 4), size=16) == (
        1.0,
        0.5,
        0.5,
    )


def test_readers_take_any_row_list_and_name_the_file_when_it_breaks(slice_path):
    """Rows may come as a list, an int32 array or nothing at all (an empty selection reads
    nothing); unknown subjects are listed (the first five, sorted); a file damaged after
    the reader opened it fails with a message naming it (HDF5 datasets read lazily)."""
    from brainuad.errors import CorruptFileError

    slices = SliceFile(slice_path)
    empty = slices.read([])
    assert empty["images"].shape == (0, 2, H, W) and empty["row"].dtype == np.int64
    assert slices.read(np.array([4, 1], dtype=np.int32))["row"].dtype == np.int64
    none = SliceDataset(slice_path, rows=[])
    assert len(none) == 0 and none.rows.dtype == np.int64 and none.subjects.tolist() == []
    with pytest.raises(InputError, match=r"not in slice file: \['c', 'd', 'e', 'f', 'g'\]$"):
        slices.rows_for_subjects(["a", "h", "g", "f", "e", "d", "c"])
    dataset = SliceDataset(slice_path)
    slices.close()
    with h5py.File(slice_path, "a") as f:  # damaged after the readers checked it
        del f["brainmask"]
    what = r"s\.h5: not a readable slice file \(HDF5, brainuad\.slices\.hdf5\) \(KeyError"
    with pytest.raises(CorruptFileError, match=what):
        slices.read([0])
    with pytest.raises(CorruptFileError, match=what):
        dataset[0]


def test_build_slice_file_label_rules_and_messages(tmp_path):
    """Only ``lesion_labels`` count as lesion, a slice with exactly ``min_lesion_pixels`` of
    them is a lesion slice (in the file and in the counts, slice by slice), and a subject
    lacking a sequence is named with the sequences it has."""
    from brainuad.slices.extract import build_slice_file

    seg = np.zeros((X, Y, Z), np.uint8)
    seg[:2, :, 1] = 1  # slice 1: 6 pixels of label 1
    seg[:2, :, 2] = 2  # slice 2: 6 pixels of label 2 and one of label 1
    seg[2, 0, 2] = 1
    files, _, _ = _volumes(tmp_path, seg_values=seg)
    options = {"sequences": ["t1"], "size": 6, "min_brain_fraction": 0.5, "attrs": {}}
    only_2 = build_slice_file(
        out_path=tmp_path / "two.h5",
        subjects={"s": files},
        min_lesion_pixels=6,
        lesion_labels=[2],
        **options,
    )
    assert only_2["per_subject"] == {"s": {"n_slices": 2, "n_lesion_slices": 1}}
    slices = SliceFile(tmp_path / "two.h5")
    assert slices.labels.tolist() == [0, 1] and slices.attrs["min_lesion_pixels"] == 6
    stored = slices.read([0, 1])["seg"]
    assert stored[0].max() == 0 and set(np.unique(stored[1]).tolist()) == {0, 2}
    both = build_slice_file(
        out_path=tmp_path / "both.h5",
        subjects={"s": files},
        min_lesion_pixels=6,
        lesion_labels=[1, 2],
        **options,
    )
    assert both["n_lesion_slices"] == 2 and SliceFile(tmp_path / "both.h5").labels.tolist() == [
        1,
        1,
    ]
    message = r"^subject s: images: missing sequence\(s\) \['flair'\]; given \['t1', 't2'\]"
    with pytest.raises(InputError, match=message):
        build_slice_file(
            out_path=tmp_path / "x.h5",
            subjects={"s": files},
            **{**options, "sequences": ["t1", "flair"]},
        )


def test_square_padding_and_resizing_by_hand():
    """Padding is symmetric (the odd pixel at the end); label maps are resized by
    nearest-exact (source pixel floor((i + 0.5) · in / out)), images bilinearly, and every
    stack is resized, whatever its number of channels."""
    from brainuad.slices.extract import _pad_square, _resize

    tall = np.ones((1, 1, 6, 1))
    wide = np.ones((1, 1, 1, 6))
    np.testing.assert_array_equal(_pad_square(tall)[0, 0].sum(axis=0), [0, 0, 6, 0, 0, 0])
    np.testing.assert_array_equal(_pad_square(wide)[0, 0].sum(axis=1), [0, 0, 6, 0, 0, 0])
    labels = np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6)
    picked = [0, 2, 3, 5]  # floor((i + 0.5) * 1.5)
    np.testing.assert_array_equal(
        _resize(labels, 4, labels=True)[0, 0], labels[0, 0][np.ix_(picked, picked)]
    )
    two_channels = np.stack([labels[0, 0], -labels[0, 0]])[None]  # [1, 2, 6, 6]
    out = _resize(two_channels, 2, labels=False)
    assert out.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(out[0, 1], -out[0, 0])
    assert _resize(two_channels, 6, labels=False) is two_channels


def test_empty_writer_and_writer_outside_its_block(tmp_path):
    """A slice file with no subject has every per-row dataset empty (N = 0 throughout);
    appending outside the ``with`` block is refused; an ignore value of 1 is an ignored
    pixel."""
    path = tmp_path / "empty.h5"
    with SliceWriter(path, sequences=["t2"], height=H, width=W, with_ignore=True):
        pass
    with h5py.File(path, "r") as f:
        assert {name: f[name].shape[0] for name in f} == dict.fromkeys(
            ("brainmask", "ignore", "images", "label", "seg", "slice_index", "subject"), 0
        )
    writer = SliceWriter(tmp_path / "x.h5", sequences=["t2"], height=H, width=W)
    images, brain, seg = _subject(1, 0, [1])
    with pytest.raises(AssertionError, match=r"^use SliceWriter as a context manager$"):
        writer.append_subject("s", images[:, :1], brain, seg, np.arange(1))
    with SliceWriter(tmp_path / "i.h5", sequences=["t2"], height=H, width=W, with_ignore=True) as w:
        w.append_subject("s", images[:, :1], brain, seg, np.arange(1), ignore=seg.clip(0, 1))
    assert SliceFile(tmp_path / "i.h5").read([0])["ignore"].sum() == 1


def test_extraction_boundaries_messages_and_resampling_against_pillow(tmp_path):
    """Label values 0..255 (also stored as integral floats) are accepted, 256 is not; one
    brain voxel keeps a slice at min_brain_fraction 0; a grid mismatch names both files;
    images are resized as Pillow's antialiased bilinear resize, masks by nearest-exact."""
    from PIL import Image

    from brainuad.io.nifti import save_nifti
    from brainuad.slices.extract import _oriented_slices, _pad_square

    with pytest.raises(
        InputError, match=r"^sequences: expected at least one sequence name, got none$"
    ):
        _extract(_volumes(tmp_path)[0], sequences=[])
    cases = {"float": (np.float32, 2), "max": (np.int16, 255), "over": (np.int16, 256)}
    for name, (dtype, value) in cases.items():
        seg = np.zeros((X, Y, Z), dtype)
        seg[0, 0, 1], seg[1, 0, 1] = value, 1
        (tmp_path / name).mkdir()
        files, _, _ = _volumes(tmp_path / name, seg_values=seg, seg_dtype=dtype)
        if name == "over":
            with pytest.raises(InputError, match=r"values span 0..256, expected 0..255"):
                _extract(files)
        else:
            assert set(np.unique(_extract(files).seg).tolist()) == {0, 1, value}
    files, image, mask = _volumes(tmp_path)
    assert _extract(files, size=1).images.shape == (2, 2, 1, 1)
    one = mask.copy()
    one[0, 0, 4] = 1  # a single brain voxel on slice 4
    save_nifti(one, np.eye(4), files["brainmask"], dtype=np.uint8)
    assert _extract(files, min_brain_fraction=0.0).slice_index.tolist() == [1, 2, 3, 4]
    save_nifti(mask, np.eye(4), files["brainmask"], dtype=np.uint8)
    out = _extract(files, size=4)  # 3 x 6 slices, padded to 6 x 6, resized to 4 x 4
    picks = np.ix_([0, 2, 3, 5], [0, 2, 3, 5])  # nearest-exact: floor((i + 0.5) * 1.5)
    for k, index in enumerate(out.slice_index):
        padded_mask = _pad_square(_oriented_slices(mask[:, :, [index]])[0])
        np.testing.assert_array_equal(out.brainmask[k], padded_mask[picks])
        for channel, sign in ((0, -1), (1, 1)):  # sequences t2 (= -t1), t1
            padded = _pad_square(_oriented_slices(sign * image[:, :, [index]])[0])
            pillow = Image.fromarray(padded.astype(np.float32), mode="F").resize(
                (4, 4), Image.BILINEAR
            )
            expected = np.where(padded_mask[picks] > 0, np.asarray(pillow), 0)
            np.testing.assert_allclose(out.images[k, channel], expected, rtol=1e-5, atol=1e-4)
    other = np.eye(4)
    other[0, 3] = 5.0
    save_nifti(np.zeros((X, Y, Z), np.uint8), other, files["seg"], dtype=np.uint8)
    with pytest.raises(InputError, match=r"seg\.nii\.gz: affine differs from its image .*t2\.nii"):
        _extract(files)


def test_ignore_mask_is_resized_as_labels(tmp_path):
    seg = np.zeros((X, Y, Z), np.uint8)
    seg[:, :, 1] = 9
    seg[2:, :, 1] = 1
    files, _, _ = _volumes(tmp_path, seg_values=seg)
    out = _extract(files, size=4, ignore_labels=[9], lesion_labels=[1])
    from brainuad.slices.extract import _oriented_slices, _pad_square

    picks = np.ix_([0, 2, 3, 5], [0, 2, 3, 5])
    expected = _pad_square(_oriented_slices((seg[:, :, [1]] == 9).astype(np.uint8))[0])[picks]
    np.testing.assert_array_equal(out.ignore[0], expected)
    np.testing.assert_array_equal(
        out.seg[0], _pad_square(_oriented_slices(seg[:, :, [1]] == 1)[0])[picks]
    )
