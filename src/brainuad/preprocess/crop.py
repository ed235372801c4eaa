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


def centred_box_centre(shape: tuple[int, ...], box: tuple[int, int, int]) -> np.ndarray:
    """The ``centre`` for :func:`crop_or_pad` that places ``box`` as torchio's
    ``CropOrPad(box)`` places it on a volume of ``shape`` (the cDDPM reference's load-time
    crop): ``ceil(d / 2)`` voxels of a difference ``d`` are cut (or padded) at the start of
    each axis, ``floor(d / 2)`` at its end."""
    diff = np.asarray(shape[:3], dtype=int) - np.asarray(box, dtype=int)
    start = np.sign(diff) * np.ceil(np.abs(diff) / 2.0)
    return start + (np.asarray(box, dtype=float) - 1.0) / 2.0


def reference_brain_box(brainmask: np.ndarray) -> tuple[slice, slice, slice]:
    """The cDDPM reference's cut to the brain (``preprocessing/cut.py``): from the first to
    the last non-zero index of the mask on each axis, the last one *excluded* (its slice
    ``[first:last]``), so one brain plane is dropped at the end of every axis."""
    if not np.any(brainmask):
        raise ValueError("brain mask is empty: it has no bounding box")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(brainmask != 0, axis=other))
        box.append(slice(int(present[0]), int(present[-1])))
    return box[0], box[1], box[2]
