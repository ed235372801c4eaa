"""Step 6: intensity normalisation to [0, 1] by percentiles inside the brain."""

from __future__ import annotations

import numpy as np


def percentile_normalise(
    data: np.ndarray,
    brainmask: np.ndarray,
    percentiles: tuple[float, float] = (1.0, 99.0),
    *,
    zero_outside: bool = True,
) -> tuple[np.ndarray, float, float]:
    """Map ``data`` linearly so the brain's lower/upper percentiles become 0 and 1.

    ``x' = clip((x - p_low) / (p_high - p_low), 0, 1)`` inside the brain, 0 outside, with
    ``p_low, p_high`` the ``percentiles`` of ``data[brainmask]``. With
    ``zero_outside=False`` the voxels outside the brain keep their mapped value: torchio's
    ``RescaleIntensity((0, 1), percentiles, masking_method=mask)``, the cDDPM reference's
    (it clips the whole volume to the two cut-offs, then maps its minimum and maximum, which
    are those cut-offs, to 0 and 1).

    Returns:
        ``(normalised float32 array, p_low, p_high)``.

    Raises:
        ValueError: if the mask is empty, the percentiles are not ordered within [0, 100],
            or the brain has a single intensity.
    """
    low_q, high_q = percentiles
    if not 0.0 <= low_q < high_q <= 100.0:
        raise ValueError(
            f"normalise_percentiles: expected 0 <= low < high <= 100, got {percentiles}"
        )
    brainmask = np.asarray(brainmask, dtype=bool)
    if not brainmask.any():
        raise ValueError("brain mask is empty: no intensities to normalise by")
    low, high = (float(v) for v in np.percentile(data[brainmask], [low_q, high_q]))
    if high <= low:
        raise ValueError(f"brain intensities are constant ({low}); cannot normalise")
    normalised = np.clip((data.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    if zero_outside:
        normalised[~brainmask] = 0.0
    return normalised.astype(np.float32), low, high
