"""Skull-stripping by registration: the template's brain mask brought into subject space.

The bias-corrected head is registered (affine by default) to the template T1 brain, and the
template brain mask is carried back through the inverse transform with linear interpolation
and thresholded at 0.5, which gives a smoother boundary than nearest neighbour.

Measured on generated heads at 2 mm (Dice vs the true mask): one affine pass 0.970; cutting
the head to the mask grown by 6 mm and registering again (``refinements=1``) 0.967-0.969,
twice as slow; a SyN pass 0.962-0.971, four times as slow. What limits this method is the
subject's non-linear shape difference from the template, not the skull, so the default is
a single pass. deepbet scores 0.98 on the same heads.
"""

from __future__ import annotations

import ants
import numpy as np
from scipy import ndimage

from brainuad.preprocess.register import register


def registration_brainmask(
    head: ants.ANTsImage,
    template_t1: ants.ANTsImage,
    template_brainmask: ants.ANTsImage,
    *,
    type_of_transform: str = "Affine",
    refinements: int = 0,
    margin_mm: float = 6.0,
    random_seed: int = 1,
) -> np.ndarray:
    """Brain mask (bool, on ``head``'s grid) from the inverse of a head-to-template registration.

    Args:
        head: bias-corrected head volume.
        template_t1: template T1 (head or brain).
        template_brainmask: brain mask of the template, on ``template_t1``'s grid.
        type_of_transform: ``ants.registration`` type for every pass.
        refinements: passes after the first, each on the head cut to the grown mask.
        margin_mm: how far the mask is grown before cutting the head for the next pass.
        random_seed: ANTs seed of every pass (≥ 1; see :func:`brainuad.preprocess.register`).
    """
    template_brain = template_t1 * template_brainmask
    moving = head
    fixed = template_t1
    mask = np.zeros(head.shape, dtype=bool)
    margin_voxels = max(1, round(margin_mm / min(head.spacing)))
    for _ in range(refinements + 1):
        with register(
            fixed, moving, type_of_transform=type_of_transform, random_seed=random_seed
        ) as registration:
            probability = registration.to_moving(template_brainmask, "linear").numpy()
        mask = probability > 0.5
        if not mask.any():
            break
        grown = ndimage.binary_dilation(mask, iterations=margin_voxels)
        moving = head.new_image_like(head.numpy() * grown)
        fixed = template_brain
    return mask
