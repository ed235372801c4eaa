"""The slice file contract: one HDF5 file per dataset, one row per kept axial slice.

Datasets (N rows, C sequences in ``attrs["sequences"]`` order):

=============  =========  ============  ===========================================
name           dtype      shape         meaning
=============  =========  ============  ===========================================
images         float32    [N, C, H, W]  normalised intensities, 0 outside the brain
brainmask      uint8      [N, H, W]     1 inside the brain
seg            uint8      [N, H, W]     lesion labels, 0 where healthy
ignore         uint8      [N, H, W]     optional: 1 where excluded from scoring (WMH label 2)
label          uint8      [N]           1 if the slice has ≥ min_lesion_pixels lesion pixels
subject        str        [N]           subject identifier
slice_index    int32      [N]           axial index in the preprocessed volume
=============  =========  ============  ===========================================

The per-slice datasets (images, brainmask, seg) are chunked one slice per chunk and
compressed with lzf, so reading one row touches one chunk; the 1-D columns use larger
chunks. The slice label (healthy 0 / lesion 1, what weakly supervised methods learn from) is
1 when the slice has at least ``min_lesion_pixels`` lesion pixels (attribute of the file;
default 1, i.e. any lesion pixel, as Wolleb et al. and AnoFPDM label their slices).

Writers are atomic (the file appears under its final name only
when complete). Readers open lazily and never load the image stack into memory.

torch is imported only by :class:`SliceDataset`, so the reporting stage, which reads slice
files through :class:`SliceFile`, runs without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path
from brainuad.io.hdf5 import read_rows
from brainuad.io.readers import corrupt_file_error, hdf5_errors, open_hdf5

CONTRACT_VERSION = 1
_STR = h5py.string_dtype(encoding="utf-8")
#: What a slice file is, in error messages.
SLICE_FILE = "slice file (HDF5, brainuad.slices.hdf5)"
#: File attributes the writer sets itself; caller ``attrs`` must not name them.
RESERVED_ATTRS = frozenset({"sequences", "contract_version", "min_lesion_pixels"})


class SliceWriter:
    """Append slices subject by subject into a new slice file, atomically.

    Use as a context manager; the file is renamed into place only if the block succeeds::

        with SliceWriter(path, sequences=["t2"], height=64, width=64, attrs={...}) as w:
            w.append_subject("sub-001", images, brainmask, seg, slice_index)

    Raises:
        InputError: when ``attrs`` names a key in ``RESERVED_ATTRS`` (before any file is
            created).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        sequences: Sequence[str],
        height: int,
        width: int,
        attrs: dict[str, Any] | None = None,
        min_lesion_pixels: int = 1,
        with_ignore: bool = False,
    ) -> None:
        self.path = Path(path)
        if int(min_lesion_pixels) != min_lesion_pixels or min_lesion_pixels < 1:
            raise InputError(
                f"slices.min_lesion_pixels: {min_lesion_pixels!r}, expected an integer ≥ 1"
            )
        self.min_lesion_pixels = int(min_lesion_pixels)
        self.with_ignore = with_ignore
        self.sequences = list(sequences)
        self.height, self.width = int(height), int(width)
        self.attrs = attrs or {}
        reserved = RESERVED_ATTRS & set(self.attrs)
        if reserved:
            raise InputError(
                f"{self.path}: attrs {sorted(reserved)} are reserved, set by the slice writer"
            )
        self._atomic = None
        self._file: h5py.File | None = None

    def __enter__(self) -> SliceWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._file = h5py.File(tmp, "w")
        c, h, w = len(self.sequences), self.height, self.width
        f = self._file
        f.create_dataset(
            "images",
            shape=(0, c, h, w),
            maxshape=(None, c, h, w),
            dtype="float32",
            chunks=(1, c, h, w),
            compression="lzf",
        )
        for name in ("brainmask", "seg", "ignore") if self.with_ignore else ("brainmask", "seg"):
            f.create_dataset(
                name,
                shape=(0, h, w),
                maxshape=(None, h, w),
                dtype="uint8",
                chunks=(1, h, w),
                compression="lzf",
            )
        f.create_dataset("label", shape=(0,), maxshape=(None,), dtype="uint8", chunks=(1024,))
        f.create_dataset("slice_index", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1024,))
        f.create_dataset("subject", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        f.attrs["sequences"] = json.dumps(self.sequences)
        f.attrs["contract_version"] = CONTRACT_VERSION
        f.attrs["min_lesion_pixels"] = self.min_lesion_pixels
        for key, value in self.attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        return self

    def append_subject(
        self,
        subject: str,
        images: np.ndarray,
        brainmask: np.ndarray,
        seg: np.ndarray,
        slice_index: np.ndarray,
        ignore: np.ndarray | None = None,
    ) -> None:
        """Append the kept slices of one subject.

        Args:
            subject: subject identifier.
            images: float ``[n, C, H, W]``.
            brainmask: ``[n, H, W]``, non-zero inside the brain.
            seg: ``[n, H, W]``, non-zero on lesions.
            slice_index: ``[n]`` axial indices in the preprocessed volume.
            ignore: ``[n, H, W]``, non-zero where voxels are excluded from scoring; required
                when the writer was made ``with_ignore``, refused otherwise.
        """
        assert self._file is not None, "use SliceWriter as a context manager"
        n = images.shape[0]
        expected = (n, len(self.sequences), self.height, self.width)
        if images.shape != expected:
            raise ValueError(f"{subject}: images shape {images.shape}, expected {expected}")
        if brainmask.shape != expected[:1] + expected[2:] or seg.shape != brainmask.shape:
            raise ValueError(
                f"{subject}: brainmask {brainmask.shape} / seg {seg.shape} "
                f"do not match images {images.shape}"
            )
        if (ignore is not None) != self.with_ignore or (
            ignore is not None and ignore.shape != brainmask.shape
        ):
            raise ValueError(
                f"{subject}: ignore mask {None if ignore is None else ignore.shape} does not "
                f"fit a writer with_ignore={self.with_ignore} and brainmask {brainmask.shape}"
            )
        f = self._file
        start = f["images"].shape[0]
        names = ("images", "brainmask", "seg", "label", "slice_index", "subject")
        for name in (*names, "ignore") if self.with_ignore else names:
            f[name].resize(start + n, axis=0)
        if ignore is not None:
            f["ignore"][start:] = (ignore > 0).astype(np.uint8)
        f["images"][start:] = images.astype(np.float32)
        f["brainmask"][start:] = (brainmask > 0).astype(np.uint8)
        f["seg"][start:] = seg.astype(np.uint8)
        lesion_pixels = (seg > 0).sum(axis=(1, 2))
        f["label"][start:] = (lesion_pixels >= self.min_lesion_pixels).astype(np.uint8)
        f["slice_index"][start:] = np.asarray(slice_index, dtype=np.int32)
        f["subject"][start:] = np.array([subject] * n, dtype=object)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._atomic is not None
        self._file.close()
        self._atomic.__exit__(exc_type, exc, tb)


class SliceFile:
    """Lazy, read-only access to a slice file; opens the HDF5 file on first use.

    Safe to hand to DataLoader workers: each process opens its own handle.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with open_hdf5(self.path, SLICE_FILE) as f:
            missing = {"images", "brainmask", "seg", "label", "subject", "slice_index"} - set(f)
            if "sequences" not in f.attrs:
                missing.add("attrs['sequences']")
            if missing:
                raise corrupt_file_error(self.path, SLICE_FILE, f"missing {sorted(missing)}")
            version = f.attrs.get("contract_version")
            if version != CONTRACT_VERSION:
                raise corrupt_file_error(
                    self.path,
                    SLICE_FILE,
                    f"contract_version {version}, this version reads {CONTRACT_VERSION}",
                )
            self.sequences: list[str] = json.loads(f.attrs["sequences"])
            self.shape: tuple[int, ...] = tuple(f["images"].shape)
            self.subjects: np.ndarray = f["subject"].asstr()[:]
            self.slice_indices: np.ndarray = f["slice_index"][:]
            self.labels: np.ndarray = f["label"][:]
            self.attrs: dict[str, Any] = dict(f.attrs)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            with hdf5_errors(self.path, SLICE_FILE):
                self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def channel_indices(self, sequences: Sequence[str] | None) -> list[int]:
        """Channel positions of ``sequences`` in this file (all channels when None).

        Raises:
            InputError: naming the file and its sequences when one is missing.
        """
        if sequences is None:
            return list(range(len(self.sequences)))
        missing = [s for s in sequences if s not in self.sequences]
        if missing or not sequences:
            raise InputError(
                f"{self.path}: sequences {list(sequences)} requested, the file holds "
                f"{self.sequences}"
            )
        return [self.sequences.index(s) for s in sequences]

    def rows_for_subjects(self, subjects: Sequence[str]) -> np.ndarray:
        """Row indices (sorted) of all slices belonging to ``subjects``."""
        wanted = set(subjects)
        unknown = wanted - set(self.subjects.tolist())
        if unknown:
            raise InputError(f"{self.path}: subjects not in slice file: {sorted(unknown)[:5]}")
        return np.flatnonzero(np.isin(self.subjects, list(wanted)))

    def read(self, rows: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """Read the given rows (any order) into memory: only those rows are touched."""
        rows = np.asarray(rows, dtype=np.int64)
        with hdf5_errors(self.path, SLICE_FILE):
            f = self.file
            out = {name: read_rows(f[name], rows) for name in ("images", "brainmask", "seg")}
            if "ignore" in f:  # datasets with labels excluded from scoring (WMH 2017)
                out["ignore"] = read_rows(f["ignore"], rows)
        out["label"] = self.labels[rows]
        out["subject"] = self.subjects[rows]
        out["slice_index"] = self.slice_indices[rows]
        out["row"] = rows
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        return state


class SliceDataset:
    """A map-style torch dataset (``__len__``, ``__getitem__``) over selected rows of a slice
    file; reads one slice per item. Not a ``torch.utils.data.Dataset`` subclass so that this
    module imports without torch; ``DataLoader`` takes it as it is.

    Each item is a dict: ``image`` float32 ``[C, H, W]``, ``brainmask`` float32 ``[1, H, W]``,
    ``seg`` uint8 ``[H, W]``, ``label`` int, ``row`` int (index in the slice file).

    Args:
        path: the slice file.
        subjects: keep the rows of these subjects (default: all rows, or ``rows``).
        rows: keep these rows.
        sequences: the channels to read, by name, in this order (a method's ``inputs``);
            default: every sequence of the file. ``C`` is their number.
        size: resample each slice to ``size`` × ``size`` (images bilinearly, masks by
            nearest neighbour; a method's own working size); default: the file's size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        subjects: Sequence[str] | None = None,
        rows: np.ndarray | None = None,
        *,
        sequences: Sequence[str] | None = None,
        size: int | None = None,
    ) -> None:
        self.slices = SliceFile(path)
        if rows is not None:
            self.rows = np.asarray(rows, dtype=np.int64)
        elif subjects is not None:
            self.rows = self.slices.rows_for_subjects(subjects)
        else:
            self.rows = np.arange(len(self.slices))
        self.channels = self.slices.channel_indices(sequences)
        self.size = None if size is None or size == self.slices.shape[-1] else int(size)

    @property
    def subjects(self) -> np.ndarray:
        """Subject of each item ``[len]`` (for per-volume sampling)."""
        return self.slices.subjects[self.rows]

    @property
    def labels(self) -> np.ndarray:
        """Slice label of each item ``[len]`` (1: lesion slice; for balanced sampling)."""
        return self.slices.labels[self.rows]

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        row = int(self.rows[index])
        with hdf5_errors(self.slices.path, SLICE_FILE):
            f = self.slices.file
            image = f["images"][row][self.channels]
            brainmask, seg = f["brainmask"][row], f["seg"][row]
        image = torch.from_numpy(image)
        brainmask = torch.from_numpy(brainmask[None].astype(np.float32))
        seg = torch.from_numpy(seg)
        if self.size is not None:
            from brainuad.slices.resize import resize_image, resize_mask

            image = resize_image(image[None], self.size)[0]
            brainmask = resize_mask(brainmask[None], self.size)[0]
            seg = resize_mask(seg[None, None], self.size)[0, 0]
        return {
            "image": image,
            "brainmask": brainmask,
            "seg": seg,
            "label": int(self.slices.labels[row]),
            "row": row,
        }


class ConcatSliceDataset:
    """Several :class:`SliceDataset` s (e.g. one per training cohort) as one dataset.

    Items are those of the parts, in order; ``subjects`` are prefixed with the part's
    dataset name (two cohorts may both have a ``sub-000``), ``labels`` concatenated.
    """

    def __init__(self, parts: Sequence[SliceDataset], names: Sequence[str]) -> None:
        if len(parts) != len(names) or not parts:
            raise InputError("ConcatSliceDataset: expected one name per part, at least one part")
        self.parts, self.names = list(parts), list(names)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def subjects(self) -> np.ndarray:
        return np.concatenate(
            [
                np.char.add(f"{name}/", part.subjects.astype(str))
                for name, part in zip(self.names, self.parts, strict=True)
            ]
        )

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([part.labels for part in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]
