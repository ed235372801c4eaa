"""Step 1: reorient a volume to RAS+ (or LPS+) voxel axes, exactly (axis flips and swaps, no
resampling)."""

from __future__ import annotations

import nibabel as nib


def reorient_to_ras(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``image`` with voxel axes permuted and flipped so they point Right, Anterior,
    Superior. Voxel values are not interpolated, so labels stay labels."""
    return nib.as_closest_canonical(image)


def reorient_to_lps(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``image`` with voxel axes pointing Left, Posterior, Superior: ITK's "RAI"
    orientation, which the cDDPM reference gives its template (and so its outputs) before
    registration, so that its voxel-index crops cut the same sides as there."""
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    return image.as_reoriented(nib.orientations.ornt_transform(current, target))
