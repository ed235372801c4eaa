"""Step 2: resample a volume to isotropic voxels with ANTs."""

from __future__ import annotations

from typing import Literal

import ants

Interpolation = Literal["bspline", "linear", "nearest"]

# ants.resample_image codes: 0 linear, 1 nearest neighbour, 4 B-spline.
_ANTS_INTERP_CODE = {"linear": 0, "nearest": 1, "bspline": 4}


def resample_to_isotropic(
    image: ants.ANTsImage, resolution_mm: float, interpolation: Interpolation
) -> ants.ANTsImage:
    """Resample ``image`` to voxels of ``resolution_mm`` on each side, same field of view.

    Args:
        image: the volume (any orientation; world coordinates are kept).
        resolution_mm: edge of the output voxels in millimetres.
        interpolation: ``"bspline"`` or ``"linear"`` for intensities, ``"nearest"`` for
            labels and masks (keeps only values present in the input). B-spline overshoots
            near sharp edges, so its output is clipped to the input's range.
    """
    if resolution_mm <= 0:
        raise ValueError(f"resolution_mm: expected a positive value, got {resolution_mm}")
    resampled = ants.resample_image(
        image,
        (resolution_mm,) * 3,
        use_voxels=False,
        interp_type=_ANTS_INTERP_CODE[interpolation],
    )
    if interpolation == "bspline":
        clipped = resampled.numpy().clip(float(image.min()), float(image.max()))
        resampled = resampled.new_image_like(clipped)
    return resampled
