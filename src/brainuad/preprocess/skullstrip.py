"""Step 4: skull-stripping, by one of two methods chosen by name.

``deepbet``: a CNN (see :mod:`brainuad.preprocess.skullstrip_deepbet`).
``template``: the template brain mask carried back through an inverse registration (see
:mod:`brainuad.preprocess.skullstrip_template`); needs no network, and is the fallback where
deepbet's training domain (adult T1 heads) does not fit.
``hdbet``: HD-BET (Isensee et al. 2019, the references' stripper), only with its weights
given by path (see :mod:`brainuad.preprocess.skullstrip_hdbet`).
"""

from __future__ import annotations

from typing import Literal

import ants
import numpy as np

from brainuad.preprocess.skullstrip_deepbet import deepbet_brainmask
from brainuad.preprocess.skullstrip_hdbet import hdbet_brainmask
from brainuad.preprocess.skullstrip_template import registration_brainmask

SkullStripMethod = Literal["deepbet", "hdbet", "template", "none"]
# "none" (a download stripped already) is handled by the pipeline, which keeps the raw grid.
SKULLSTRIP_METHODS: tuple[str, ...] = ("deepbet", "hdbet", "template", "none")


def skull_strip(
    head_ras: ants.ANTsImage,
    *,
    method: SkullStripMethod,
    template_t1: ants.ANTsImage,
    template_brainmask: ants.ANTsImage,
    deepbet_threshold: float = 0.5,
    registration_type: str = "Affine",
    random_seed: int = 1,
    hdbet_weights: str | None = None,
) -> np.ndarray:
    """Brain mask (bool, on ``head_ras``'s grid) of a T1 head whose voxel axes are RAS.

    May return an empty mask; the caller decides how to report it. ``random_seed`` is the
    ANTs seed of the ``template`` method's registration (≥ 1).
    """
    if method == "deepbet":
        return deepbet_brainmask(head_ras.numpy(), threshold=deepbet_threshold)
    if method == "template":
        return registration_brainmask(
            head_ras,
            template_t1,
            template_brainmask,
            type_of_transform=registration_type,
            random_seed=random_seed,
        )
    if method == "hdbet":
        return hdbet_brainmask(head_ras, weights=hdbet_weights)
    raise ValueError(f"skullstrip_method: '{method}' is not one of {SKULLSTRIP_METHODS}")
