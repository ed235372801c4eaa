"""Reading every file a subject sheet points to, once, before any job uses it.

A malformed download should fail when the sheet is built, naming the file and what was
expected, not hours later in the middle of preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from brainuad.data.adapters.base import LabelConvention, SubjectRecord
from brainuad.errors import InputError


def read_volume(path: str | os.PathLike) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Image and voxels of a 3D NIfTI, read once.

    Raises:
        InputError: naming ``path`` when it is missing, unreadable or truncated, not 3D,
            or has NaN / infinite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel, gzip and zlib raise many types for corrupt files
        raise InputError(
            f"{path}: not a readable NIfTI file, truncated or corrupt ({type(err).__name__}: {err})"
        ) from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputError(f"{path}: volume contains NaN or infinite values")
    return img, data


def _same_grid(path: Path, img: nib.Nifti1Image, ref_path: Path, ref: nib.Nifti1Image) -> None:
    if img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise InputError(
            f"{path}: grid (shape {img.shape[:3]}) differs from its image {ref_path} "
            f"(shape {ref.shape[:3]}); expected the same shape and affine"
        )


def check_labels(path: Path, data: np.ndarray, labels: LabelConvention) -> dict[int, int]:
    """Voxel count per label value; refuses non-integer, unknown and all-healthy labels."""
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise InputError(f"{path}: non-integer label values; expected {labels.allowed}")
    values = data.astype(np.int64, copy=False).ravel()
    if values.min() < 0:
        raise InputError(f"{path}: negative label values; expected {labels.allowed}")
    counts = np.bincount(values)
    present = {int(v): int(c) for v, c in enumerate(counts) if c}
    unknown = sorted(set(present) - set(labels.allowed))
    if unknown:
        raise InputError(
            f"{path}: unknown label value(s) {unknown}; expected only {list(labels.allowed)} "
            f"({labels.description})"
        )
    if not any(present.get(v, 0) for v in labels.lesion):
        raise InputError(
            f"{path}: lesion mask is empty; expected voxels with label(s) {list(labels.lesion)}"
        )
    return present


def validate_record(
    record: SubjectRecord,
    *,
    sequences: Sequence[str],
    labels: LabelConvention | None,
    same_grid: bool,
) -> dict[str, object]:
    """Read the files of ``record`` the study uses and refuse malformed ones.

    Args:
        record: the discovered subject.
        sequences: the sequences the study uses, reference sequence first; each must be in
            ``record.files``.
        labels: the dataset's label convention; None for a healthy dataset (no seg read).
        same_grid: every sequence must share the reference's grid (False where
            preprocessing co-registers them, as for IXI).

    Returns:
        Metadata for the sheet: label voxel counts (``label_voxels``) where there is a seg.

    Raises:
        InputError: naming the file: missing, truncated, not 3D, NaN, empty (constant)
            image, a segmentation or shipped brain mask on another grid than the reference
            sequence, an empty brain mask, an unknown or non-integer label, or no lesion
            voxel.
    """
    missing = [s for s in sequences if s not in record.files]
    if missing:
        raise InputError(
            f"subject {record.source_id}: no {', '.join(missing)} image; "
            f"found {sorted(record.files)}"
        )
    ref_path = Path(record.files[sequences[0]])
    reference = None
    for sequence in sequences:
        path = Path(record.files[sequence])
        img, data = read_volume(path)
        if data.size == 0 or data.min() == data.max():
            raise InputError(f"{path}: image is empty (every voxel is {data.flat[0]})")
        if reference is None:
            reference = img
        elif same_grid:
            _same_grid(path, img, ref_path, reference)
    if "brainmask_truth" in record.files:  # a brain mask shipped with the download
        path = Path(record.files["brainmask_truth"])
        img, data = read_volume(path)
        _same_grid(path, img, ref_path, reference)
        if not data.any():
            raise InputError(f"{path}: brain mask is empty; expected brain voxels > 0")
    info: dict[str, object] = {}
    if labels is not None:
        if "seg" not in record.files:
            raise InputError(f"subject {record.source_id}: no segmentation file found")
        path = Path(record.files["seg"])
        img, data = read_volume(path)
        _same_grid(path, img, ref_path, reference)
        counts = check_labels(path, data, labels)
        info["label_voxels"] = {str(k): v for k, v in counts.items() if k}
    return info
