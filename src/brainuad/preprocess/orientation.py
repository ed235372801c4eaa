"""Step 1: reorient a volume to RAS+ voxel axes, exactly (axis flips and swaps, no resampling)."""

from __future__ import annotations

import nibabel as nib


def reorient_to_ras(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``image`` with voxel axes permuted and flipped so they point Right, Anterior,
    Superior. Voxel values are not interpolated, so labels stay labels."""
    return nib.as_closest_canonical(image)
