"""Post-processing of anomaly maps, as in cDDPM's evaluation.

Source: FinnBehrendt/Conditioned-Diffusion-Models-UAD, ``src/utils/utils_eval.py``
(Behrendt et al., https://arxiv.org/abs/2312.04215):

1. ``apply_brainmask_volume``: the brain mask is eroded slice by slice with a 2D cross
   (4-connected) structuring element, ``iterations = W // 25`` (3 at 96 px), and the map is
   multiplied by the eroded mask. Pixels on the image border count as outside (scipy's
   ``border_value=0``).
2. ``apply_3d_median_filter``: a 3D median filter with a cubic kernel of 5 (scipy's default
   ``reflect`` boundary).
3. After thresholding (``map > threshold``), ``filter_3d_connected_components`` labels 3D
   components with 26-connectivity (skimage ``connectivity=3``) and removes those whose
   ``filled_area`` (voxel count with enclosed holes filled) is ``<= 7``.

One addition: after the median filter the map is zeroed outside the eroded mask again. The
filter lets values leak a few voxels outwards; all metrics here are computed inside the eroded
mask, so this changes nothing inside it and keeps binarised maps inside the evaluated region.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

# 2D cross in-plane, nothing across slices: a 3D erosion with it is a per-slice 2D erosion.
_INPLANE_CROSS = ndimage.generate_binary_structure(2, 1)[None]
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity in 3D: components and lesions everywhere in evaluation use it."""


@dataclass(frozen=True)
class PostprocessConfig:
    """How raw anomaly maps become maps and masks that are evaluated.

    Attributes:
        erode_iterations: erosions of the brain mask per slice; ``"auto"`` is ``W // 25``
            (cDDPM ``apply_brainmask_volume``). 0 keeps the mask as is.
        median_kernel: cubic 3D median filter size (cDDPM ``kernelsize_median`` = 5);
            0 or 1 turns it off.
        min_component_voxels: after thresholding, 3D components (26-connected) whose
            hole-filled size is ``<=`` this are removed (cDDPM: 7); 0 turns it off.
        apply_brainmask: zero the map outside the eroded brain mask and evaluate only inside
            it (cDDPM ``erodeBrainmask``). If False nothing is masked and the whole volume
            is evaluated.
    """

    erode_iterations: int | Literal["auto"] = "auto"
    median_kernel: int = 5
    min_component_voxels: int = 7
    apply_brainmask: bool = True

    def __post_init__(self) -> None:
        if self.erode_iterations != "auto" and (
            not isinstance(self.erode_iterations, int) or self.erode_iterations < 0
        ):
            raise ValueError(
                f"PostprocessConfig.erode_iterations: expected 'auto' or an int >= 0, "
                f"got {self.erode_iterations!r}"
            )
        if self.median_kernel < 0 or self.min_component_voxels < 0:
            raise ValueError(
                "PostprocessConfig.median_kernel and min_component_voxels must be >= 0, got "
                f"{self.median_kernel}, {self.min_component_voxels}"
            )

    def iterations_for(self, width: int) -> int:
        """Erosion iterations for slices of ``width`` pixels."""
        return width // 25 if self.erode_iterations == "auto" else int(self.erode_iterations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PostprocessConfig:
        return cls(**(values or {}))


def erode_brainmask(brainmask: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The evaluated region: the brain mask ``[S, H, W]`` eroded per slice, as bool.

    With ``cfg.apply_brainmask`` False the whole volume is the evaluated region.
    """
    mask = np.asarray(brainmask) > 0
    if not cfg.apply_brainmask:
        return np.ones_like(mask)
    iterations = cfg.iterations_for(mask.shape[-1])
    if iterations == 0:  # scipy reads iterations=0 as "until nothing changes"
        return mask
    return ndimage.binary_erosion(mask, structure=_INPLANE_CROSS, iterations=iterations)


def postprocess_map(
    anomaly_map: np.ndarray,
    brainmask: np.ndarray,
    cfg: PostprocessConfig,
    *,
    remask: bool = True,
) -> np.ndarray:
    """Mask (eroded brain mask) and median-filter an anomaly map ``[S, H, W]``.

    Args:
        remask: zero the map outside the eroded mask again after the median filter (the
            module doc's addition). The ``reference`` evaluation mode, which evaluates every
            voxel as cDDPM does, turns it off so that the values the filter spreads out of
            the mask count as in the reference.

    Returns:
        float32 ``[S, H, W]``, zero outside the eroded brain mask (with ``remask``).
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != np.shape(brainmask):
        raise ValueError(f"anomaly map {amap.shape} and brain mask {np.shape(brainmask)} differ")
    mask = erode_brainmask(brainmask, cfg)
    out = amap * mask
    if cfg.median_kernel > 1:
        out = ndimage.median_filter(out, size=cfg.median_kernel)
        if remask:
            out *= mask
    return out.astype(np.float32, copy=False)


def remove_small_components(binary: np.ndarray, max_voxels: int) -> np.ndarray:
    """Drop 26-connected components whose hole-filled size is ``<= max_voxels``.

    cDDPM compares skimage's ``filled_area``: the voxel count with enclosed holes filled,
    where a hole is background not 26-connected to the border of the component's bounding
    box. The same is done here. (At the default of 7 this equals the plain voxel count: a
    26-connected background hole needs all 26 neighbours of a voxel to be foreground.)
    """
    binary = np.asarray(binary, dtype=bool)
    if max_voxels <= 0 or not binary.any():
        return binary
    labels, n = ndimage.label(binary, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # Components of fewer than 26 voxels cannot enclose a hole: drop them at once and fill
    # holes only for the larger ones left to decide.
    drop = (sizes <= max_voxels) & (sizes < 26)
    drop[0] = False
    boxes = ndimage.find_objects(labels)
    undecided = np.flatnonzero((sizes <= max_voxels) & (sizes >= 26))
    for lab in undecided[undecided > 0]:
        box = boxes[lab - 1]
        region = labels[box] == lab
        filled = ndimage.binary_fill_holes(region, structure=CONNECTIVITY_26)
        drop[lab] = filled.sum() <= max_voxels
    return binary & ~drop[labels]


def binarise(anomaly_map: np.ndarray, threshold: float, cfg: PostprocessConfig) -> np.ndarray:
    """Threshold a post-processed map (``map > threshold``) and drop small 3D components.

    Returns:
        bool ``[S, H, W]``.
    """
    binary = np.asarray(anomaly_map) > threshold
    return remove_small_components(binary, cfg.min_component_voxels)
