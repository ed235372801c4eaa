"""Conversion between nibabel images (RAS world) and ANTsPy images (LPS world).

ANTsPy's own ``nifti_to_ants`` ignores the RAS-to-LPS flip, so the conversion is done here
once: ITK stores origin and direction in LPS, NIfTI affines map voxels to RAS.
"""

from __future__ import annotations

import ants
import nibabel as nib
import numpy as np

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_to_ants(image: nib.Nifti1Image, dtype: type = np.float32) -> ants.ANTsImage:
    """ANTs image with the same voxels and voxel-to-world mapping as ``image``."""
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = _RAS_TO_LPS @ (affine[:3, :3] / spacing)
    origin = _RAS_TO_LPS @ affine[:3, 3]
    data = np.asanyarray(image.dataobj).astype(dtype)
    return ants.from_numpy(
        data, origin=origin.tolist(), spacing=spacing.tolist(), direction=direction
    )


def ants_affine(image: ants.ANTsImage) -> np.ndarray:
    """The 4 x 4 voxel-to-RAS affine of an ANTs image."""
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.origin)
    return affine


def ants_to_nifti(image: ants.ANTsImage) -> nib.Nifti1Image:
    """nibabel image with the same voxels and voxel-to-world mapping as ``image``."""
    return nib.Nifti1Image(image.numpy(), ants_affine(image))
