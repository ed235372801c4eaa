"""Label volumes carried through a transform as the cDDPM reference carries them.

The reference (``preprocessing/registration.py``) moves masks and lesion labels with
``ants.apply_transforms``' default, *linear* interpolation, and its loader and evaluation
keep every voxel above 0 (``data_seg[data_seg > 0] = 1``; the brain mask likewise). That
is not nearest neighbour: a label grows by the voxels its linear interpolation touches at
all. For several label values (BraTS 1/2/4, WMH's "other pathology" 2) each value's
indicator is interpolated on its own; a voxel where any is above 0 takes the value with the
largest interpolated weight, so a binary label volume gets exactly "linear, then > 0".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def linear_positive_labels(
    labels: np.ndarray, move_linear: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Labels moved by ``move_linear`` (a linear-interpolation resampler of float volumes
    onto the output grid), kept wherever their interpolated weight is above 0.

    Returns:
        uint8 labels on the output grid (0 where no label's interpolation reaches).
    """
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        return np.zeros(move_linear(np.zeros(labels.shape, np.float32)).shape, np.uint8)
    weights = np.stack([move_linear((labels == v).astype(np.float32)) for v in values])
    best = np.argmax(weights, axis=0)
    out = np.asarray(values, dtype=np.uint8)[best]
    return np.where(weights.max(axis=0) > 0, out, 0).astype(np.uint8)
