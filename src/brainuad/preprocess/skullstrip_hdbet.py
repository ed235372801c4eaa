"""HD-BET (Isensee et al. 2019, https://doi.org/10.1002/hbm.24750), the skull-stripper of the
cDDPM/pDDPM references, used only when the user gives its weights by path.

Nothing is downloaded at run time, so the ``hd-bet`` package (not a dependency of
brainuad) and a folder of its model files must both be present; otherwise the error says
which is missing and what to set instead (``skullstrip_method: deepbet``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ants
import numpy as np

from brainuad.errors import InputError


def check_hdbet(weights: str | None) -> Path:
    """The weights folder, or InputError naming ``preprocess.hdbet_weights`` / the package."""
    if not weights:
        raise InputError(
            "preprocess.hdbet_weights: skullstrip_method 'hdbet' needs the folder of the "
            "HD-BET model files; none given (or use skullstrip_method: deepbet)"
        )
    folder = Path(weights)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(
            f"preprocess.hdbet_weights: {folder} is not a folder of HD-BET model files"
        )
    if importlib.util.find_spec("HD_BET") is None:
        raise InputError(
            f"preprocess.skullstrip_method: 'hdbet' needs the hd-bet package, which is not "
            f"installed (weights {folder}); install it or use skullstrip_method: deepbet"
        )
    return folder


def hdbet_brainmask(head_ras: ants.ANTsImage, *, weights: str | None) -> np.ndarray:
    """Brain mask of ``head_ras`` by HD-BET. Only the checks above are implemented: running
    the network needs the optional hd-bet package, which this environment cannot install."""
    folder = check_hdbet(weights)
    raise InputError(
        f"preprocess.skullstrip_method: running HD-BET (weights {folder}) is not wired in "
        "this version of brainuad; use skullstrip_method: deepbet or template"
    )
