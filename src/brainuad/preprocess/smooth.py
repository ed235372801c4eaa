"""CurvatureFlow smoothing, as the cDDPM reference's loader applies it to every image volume.

The reference (FinnBehrendt/Conditioned-Diffusion-Models-UAD,
``src/datamodules/create_dataset.py``, ``sitk_reader``) reads each scalar volume with
SimpleITK as float32 and runs ``sitk.CurvatureFlow(timeStep=0.125, numberOfIterations=3)``
before any crop or normalisation (masks and labels are not smoothed). The same SimpleITK
filter runs here, on the volume with its voxel spacing (ITK's finite-difference filters use
the image spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The reference loader's settings.
CURVATURE_FLOW_TIME_STEP = 0.125
CURVATURE_FLOW_ITERATIONS = 3


def curvature_flow(
    volume: np.ndarray,
    spacing: Sequence[float],
    *,
    time_step: float = CURVATURE_FLOW_TIME_STEP,
    iterations: int = CURVATURE_FLOW_ITERATIONS,
) -> np.ndarray:
    """``volume`` (voxel axes i, j, k) smoothed by SimpleITK's ``CurvatureFlow`` filter.

    Args:
        volume: a 3D intensity volume.
        spacing: voxel edge lengths in mm along i, j, k.
        time_step, iterations: the filter's ``timeStep`` and ``numberOfIterations``.

    Returns:
        float32 array of ``volume``'s shape.
    """
    import SimpleITK as sitk  # noqa: N813 (only the cddpm pipeline needs it)

    if volume.ndim != 3:
        raise ValueError(f"curvature_flow: expected a 3D volume, got shape {volume.shape}")
    # SimpleITK arrays are indexed (k, j, i).
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(np.transpose(volume, (2, 1, 0)), np.float32)
    )
    image.SetSpacing(tuple(float(s) for s in spacing))
    smoothed = sitk.CurvatureFlow(
        image1=image, timeStep=float(time_step), numberOfIterations=int(iterations)
    )
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(smoothed), (2, 1, 0)))
