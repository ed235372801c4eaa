"""The MNI152 2009a template that ships inside nilearn: anatomy source and registration target.

nilearn carries, in its package folder ``nilearn/datasets/data/``, the skull-stripped
MNI ICBM152 2009a nonlinear symmetric T1 template and its grey- and white-matter probability
maps (files ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``; 197 x 233 x 189
voxels, 1 mm isotropic, RAS, stored as 0-255). brainuad uses them twice:
the synthetic cohort (:mod:`brainuad.data.synthetic`) deforms them into subjects, and
preprocessing registers every subject to the T1 and its brain mask. Nothing is downloaded:
the files are read from the installed package, and their absence is an error.

Coordinate convention: ``MNITemplate.affine`` maps template voxel indices ``(i, j, k)`` to
MNI world millimetres ``(x, y, z)`` in RAS+ (x to the right, y anterior, z superior).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainuad.errors import InputError
from brainuad.io.nifti import save_nifti

_FILE_PATTERN = "mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"

# The template is 0 outside the brain and >= ~40 inside, so any small positive threshold
# gives the same mask; 1 (of 255) only guards against interpolation dust.
_BRAIN_THRESHOLD = 1.0


@dataclass(frozen=True, eq=False)
class MNITemplate:
    """The MNI152 2009a template on its own 1 mm RAS grid (arrays are read-only).

    Attributes:
        t1: T1 intensities, float32, skull-stripped, original scale 0-255.
        gm: grey-matter probability in [0, 1], float32.
        wm: white-matter probability in [0, 1], float32.
        csf: CSF probability in [0, 1], float32: ``clip(brainmask - gm - wm, 0, 1)``.
        brainmask: uint8, 1 where ``t1`` exceeds a small threshold, holes filled.
        affine: 4 x 4 voxel-to-MNI-millimetre (RAS+) matrix.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brainmask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape, ``(197, 233, 189)`` for the 2009a template."""
        return tuple(self.t1.shape)


def template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 files."""
    # Found without importing nilearn (seconds), so config checks at workflow start are quick.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "nilearn is not installed: the MNI152 template is read from its package data"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _template_file(kind: str) -> Path:
    path = template_dir() / _FILE_PATTERN.format(kind=kind)
    if not path.is_file():
        raise InputError(
            f"{path}: MNI152 2009a {kind.upper()} template missing from the installed nilearn "
            "package; reinstall nilearn==0.13.1 (brainuad never downloads it)"
        )
    return path


def template_t1_path() -> Path:
    """Path of the MNI152 2009a T1 file inside the installed nilearn package."""
    return _template_file("t1")


def _read(kind: str) -> tuple[np.ndarray, np.ndarray]:
    path = _template_file(kind)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({err})") from err
    return data, img.affine


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _brainmask_of(t1: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(t1 > _BRAIN_THRESHOLD)


def load_template_brainmask(*, fill_holes: bool = True) -> np.ndarray:
    """The template brain mask alone (bool, 1 mm RAS grid), as in :func:`load_mni_template`
    but reading only the T1 file. ``fill_holes=False`` skips the hole filling (seconds);
    the bounding box and axial areas used by the config checks come out the same."""
    t1 = _read("t1")[0]
    return _brainmask_of(t1) if fill_holes else t1 > _BRAIN_THRESHOLD


@functools.lru_cache(maxsize=1)
def load_mni_template() -> MNITemplate:
    """Load the MNI152 2009a T1, tissue probabilities and brain mask (cached per process).

    Raises:
        InputError: naming the file if one of the template files is missing or unreadable,
            or if the grey/white-matter maps are not on the T1 grid.
    """
    t1, affine = _read("t1")
    gm, gm_affine = _read("gm")
    wm, wm_affine = _read("wm")
    for kind, data, aff in (("gm", gm, gm_affine), ("wm", wm, wm_affine)):
        if data.shape != t1.shape or not np.allclose(aff, affine, atol=1e-4):
            raise InputError(
                f"{_template_file(kind)}: grid {data.shape} differs from the T1 template "
                f"grid {t1.shape}"
            )
    brainmask = _brainmask_of(t1)
    # The maps are stored as 0-255; tissue outside the mask is template blur, not brain.
    gm = np.clip(gm / 255.0, 0.0, 1.0) * brainmask
    wm = np.clip(wm / 255.0, 0.0, 1.0) * brainmask
    csf = np.clip(brainmask - gm - wm, 0.0, 1.0)
    return MNITemplate(
        t1=_read_only(t1.astype(np.float32)),
        gm=_read_only(gm.astype(np.float32)),
        wm=_read_only(wm.astype(np.float32)),
        csf=_read_only(csf.astype(np.float32)),
        brainmask=_read_only(brainmask.astype(np.uint8)),
        affine=_read_only(np.array(affine, dtype=np.float64)),
    )


def write_template_files(t1_path: str | os.PathLike, brainmask_path: str | os.PathLike) -> None:
    """Write the template T1 (float32) and its brain mask (uint8) as NIfTI, atomically.

    These are the registration targets of preprocessing.
    """
    template = load_mni_template()
    save_nifti(template.t1, template.affine, t1_path, dtype=np.float32)
    save_nifti(template.brainmask, template.affine, brainmask_path, dtype=np.uint8)
