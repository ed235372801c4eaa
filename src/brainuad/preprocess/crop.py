"""Step 7: crop or pad a volume to a fixed box, keeping its world coordinates."""

from __future__ import annotations

import numpy as np


def brain_box_centre(brainmask: np.ndarray) -> np.ndarray:
    """Centre (voxel coordinates, may be half-integer) of the bounding box of ``brainmask``."""
    indices = np.nonzero(brainmask)
    if len(indices[0]) == 0:
        raise ValueError("brain mask is empty: it has no bounding box")
    return np.array([(axis.min() + axis.max()) / 2.0 for axis in indices])


def crop_or_pad(
    data: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    centre: np.ndarray,
    fill_value: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a ``shape`` box centred on voxel ``centre`` out of ``data``, padding outside it.

    Returns:
        ``(box, box_affine)``: ``box[i, j, k]`` is ``data[start + (i, j, k)]`` (or
        ``fill_value`` where that lies outside ``data``), and ``box_affine`` maps the box's
        voxels to the same world points as ``affine`` maps ``data``'s.
    """
    shape_arr = np.asarray(shape, dtype=int)
    if shape_arr.shape != (3,) or np.any(shape_arr <= 0):
        raise ValueError(f"crop_shape: expected three positive integers, got {shape}")
    start = np.floor(np.asarray(centre, dtype=float) - (shape_arr - 1) / 2.0 + 0.5).astype(int)
    box = np.full(tuple(shape_arr), fill_value, dtype=data.dtype)
    source, target = [], []
    for axis in range(3):
        lo = max(start[axis], 0)
        hi = min(start[axis] + shape_arr[axis], data.shape[axis])
        if hi <= lo:  # box entirely outside the volume on this axis: all fill
            return box, _shifted_affine(affine, start)
        source.append(slice(lo, hi))
        target.append(slice(lo - start[axis], hi - start[axis]))
    box[tuple(target)] = data[tuple(source)]
    return box, _shifted_affine(affine, start)


def _shifted_affine(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(affine, dtype=np.float64) @ shift
