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
    expected = r"m.h5: .*missing \[.attrs\[.sequences.\]., 'brainmask', 'label'"
    with pytest.raises(InputError, match=expected):
        SliceFile(missing)
    with h5py.File(slice_path, "a") as f:
        f.attrs["contract_version"] = CONTRACT_VERSION + 1
    with pytest.raises(
        InputError, match=f"contract_version {CONTRACT_VERSION + 1}, this version reads"
    ):
        SliceFile(slice_path)


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
    with pytest.raises(InputError, match="one name per part, at least one part"):
        ConcatSliceDataset([first], ["a", "b"])
    with pytest.raises(InputError, match="one name per part, at least one part"):
        ConcatSliceDataset([], [])
