"""Reading and writing NIfTI volumes with clear errors and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path
from brainuad.io.readers import corrupt_file_error


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI image and check it is a finite 3D volume.

    Raises:
        InputError: naming ``path`` if it is missing, unreadable, not 3D or has
            non-finite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise corrupt_file_error(path, "NIfTI file", err) from err
    if data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputError(f"{path}: volume contains NaN or infinite values")
    return img


def check_same_grid(
    image_path: str | os.PathLike,
    image: nib.Nifti1Image,
    other_path: str | os.PathLike,
    other: nib.Nifti1Image,
) -> None:
    """Raise InputError unless ``other`` has the same shape and affine as ``image``."""
    if other.shape != image.shape:
        raise InputError(
            f"{other_path}: shape {other.shape} differs from its image {image_path} "
            f"with shape {image.shape}"
        )
    if not np.allclose(other.affine, image.affine, atol=1e-3):
        raise InputError(f"{other_path}: affine differs from its image {image_path}")


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    dtype: type | np.dtype | None = None,
) -> None:
    """Write ``data`` with ``affine`` to ``path`` atomically (temp file, then rename)."""
    if dtype is not None:
        data = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
