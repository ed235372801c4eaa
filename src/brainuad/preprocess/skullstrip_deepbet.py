"""Skull-stripping with deepbet (Fisch et al. 2024, doi:10.1016/j.compbiomed.2024.108845).

deepbet is two TorchScript U-Nets shipped inside its package: a bounding-box net run on the
whole head resized to 128^3, then the mask net run on the brain box resized to 256^3 (by
default); the mask is brought back to the input grid, thresholded, reduced to its largest
connected component and hole-filled. The input grid therefore only changes how finely the
mask is sampled, not what the networks see. Runs on CPU here.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

#: The grids deepbet's two networks run on, whatever the input grid (for the QC record).
DEEPBET_GRIDS = {"bbox_net_whole_head": [128, 128, 128], "mask_net_brain_box": [256, 256, 256]}


@functools.lru_cache(maxsize=1)
def _brain_extraction():  # deepbet has no type hints
    # Imported lazily: loading the two TorchScript models takes a few seconds.
    from deepbet import BrainExtraction

    with warnings.catch_warnings():
        # deepbet 1.0.2 loads its models with torch.jit.load, deprecated in recent torch.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return BrainExtraction(no_gpu=True)


def deepbet_brainmask(
    head_ras: np.ndarray,
    *,
    threshold: float = 0.5,
    model_shape: tuple[int, int, int] = (256, 256, 256),
) -> np.ndarray:
    """Brain mask (bool, same shape) of a head volume whose voxel axes are RAS.

    Args:
        head_ras: T1-weighted head, voxel axes in RAS order (deepbet's own convention).
        threshold: probability above which a voxel is brain.
        model_shape: grid the mask net runs on; deepbet's default is 256^3, smaller grids
            are faster on CPU and coarser.

    Raises:
        ValueError: when deepbet finds no brain (no foreground for its bounding box).
    """
    bet = _brain_extraction()
    x = np.ascontiguousarray(head_ras, dtype=np.float32)
    with torch.inference_mode():
        try:
            probability = bet.run_model(x.copy(), shape=model_shape)
        except AssertionError as err:  # deepbet asserts when its bounding box is empty
            raise ValueError(f"deepbet found no brain: {err}") from err
    mask = probability > threshold
    if not mask.any():
        return mask
    return bet.postprocess(mask, n_dilate=0).astype(bool)
