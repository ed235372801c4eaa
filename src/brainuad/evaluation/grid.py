"""Evaluation modes: the grid and the voxels that every threshold and metric sees.

A subject volume (:class:`brainuad.evaluation.volumes.SubjectVolume`) is the stack of its
axial slices from the slice file: in-plane, ``slices.size`` pixels of
``preprocess.resolution_mm · max(crop_shape[:2]) / slices.size`` mm
(:func:`brainuad.slices.extract.slice_voxel_spacing`; 2 mm in ``config/paper.yaml``, 192 px
at 1 mm resized to 96); between slices, ``preprocess.resolution_mm``. ``slice_index`` is the
index along the last (superior) axis of the cropped, RAS-ordered preprocessed volume, which
has ``crop_shape[2]`` slices; the slicer keeps only the slices that pass its brain-area
filter (``slices.min_brain_fraction``). :func:`evaluate_volume` turns it into an
:class:`EvaluatedVolume` in one of two modes (``evaluation.mode``):

``brain_mask`` (the default)
    The stacked slices as they are (gaps between kept slices zero-filled), post-processed
    there (:mod:`brainuad.evaluation.postprocess`: eroded brain mask, median filter, the map
    zeroed outside the eroded mask again); only voxels of the eroded brain mask are
    evaluated, and the ground truth is clipped to them.

``reference``
    The evaluation of the cDDPM reference (FinnBehrendt/Conditioned-Diffusion-Models-UAD,
    ``src/datamodules/create_dataset.py`` ``get_transform`` with ``imageDim [192, 192, 100]``
    and ``rescaleFactor 2``, ``resizedEvaluation: True``; ``src/utils/utils_eval.py``
    ``_test_step``): a 2 mm isotropic 96 × 96 × 50 volume from the central 100 mm of the
    cropped 1 mm volume, post-processed on that grid, every voxel evaluated. Built here:

    1. *Whole slice axis.* The subject's slices are placed at their ``slice_index`` in a
       stack of ``depth`` (``crop_shape[2]``) slices; slices the slice file does not hold
       (no brain, or below ``min_brain_fraction``) have no map, no brain and no lesion
       (zero), and are counted in ``absent_slices``.
    2. *Central extent.* ``n = round(extent_mm / source_spacing_mm)`` slices (100 at 1 mm)
       starting at slice ``ceil((depth - n) / 2)``, as torchio's ``CropOrPad`` centres a
       crop; a volume shorter than ``n`` is zero-padded, ``ceil`` of the padding before it.
    3. *Resampling along the slice axis* to ``slice_spacing_mm``: ``m = round(extent_mm /
       slice_spacing_mm)`` slices (50), slice ``j`` at window position
       ``p_j = (j + 1/2) · f - 1/2`` with ``f = slice_spacing_mm / source_spacing_mm``, the
       voxel-centre convention of torchio's ``Resample`` (the outer voxel edges stay in
       place). At ``f = 2``, ``p_j = 2j + 1/2``: the anomaly map is linearly interpolated
       (the mean of slices ``2j`` and ``2j + 1``); brain mask, segmentation and ignore mask
       take the nearest slice, a tie to the upper one (ITK rounds half up). In-plane nothing
       is resampled: the slices already have their in-plane pixel (2 mm in
       ``config/paper.yaml``). The map is resampled before post-processing, as the
       reference computes its maps on the 2 mm grid.
    4. *Post-processing on that grid*: the brain mask eroded per slice (``W // 25``), the
       3D median filter (5 voxels = 10 mm) and, after thresholding, components of at most
       7 voxels (of 8 mm³) dropped; the map is not zeroed again after the median filter.
    5. *Every voxel evaluated*: background and lesion voxels outside the eroded mask count;
       only ``ignore`` voxels (WMH 2017's "other pathology") are left out.

Slice-level detection scores the evaluation grid's slices: in ``brain_mask`` mode the slices
of the slice file (statistic inside the eroded mask, label from the slice file); in
``reference`` mode every reference slice (statistic inside the brain mask, as the
reference's slice scores, label = any lesion voxel in that slice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from brainuad.errors import InputError
from brainuad.evaluation.postprocess import PostprocessConfig, erode_brainmask, postprocess_map
from brainuad.evaluation.volumes import SubjectVolume

EvaluationMode = Literal["brain_mask", "reference"]
EVALUATION_MODES = ("brain_mask", "reference")


@dataclass(frozen=True)
class EvaluationConfig:
    """Which grid and voxels are evaluated (module doc).

    Attributes:
        mode: ``brain_mask`` or ``reference``.
        extent_mm: reference: the central extent kept along the slice axis (cDDPM: 100).
        slice_spacing_mm: reference: slice spacing of the evaluation grid (cDDPM: 2).
        source_spacing_mm: slice spacing of the slice file (``preprocess.resolution_mm``);
            needed by ``reference``.
        depth: slices of the cropped volume along the slice axis (``crop_shape[2]``);
            needed by ``reference``.
    """

    mode: EvaluationMode = "brain_mask"
    extent_mm: float = 100.0
    slice_spacing_mm: float = 2.0
    source_spacing_mm: float | None = None
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in EVALUATION_MODES:
            raise ValueError(
                f"evaluation.mode: expected one of {EVALUATION_MODES}, got {self.mode!r}"
            )
        if self.mode == "reference":
            if self.source_spacing_mm is None or self.depth is None:
                raise ValueError(
                    "evaluation.mode 'reference' needs source_spacing_mm "
                    "(preprocess.resolution_mm) and depth (crop_shape[2])"
                )
            if min(self.extent_mm, self.slice_spacing_mm, self.source_spacing_mm) <= 0:
                raise ValueError(
                    "EvaluationConfig: extent_mm, slice_spacing_mm and source_spacing_mm must "
                    f"be > 0, got {self.extent_mm}, {self.slice_spacing_mm}, "
                    f"{self.source_spacing_mm}"
                )
            if self.depth < 1 or self.n_window < 1 or self.n_slices < 1:
                raise ValueError(f"EvaluationConfig: empty reference grid from {self.to_dict()}")

    @property
    def n_window(self) -> int:
        """Source slices in the central extent."""
        return round(self.extent_mm / float(self.source_spacing_mm))

    @property
    def n_slices(self) -> int:
        """Slices of the reference grid."""
        return round(self.extent_mm / self.slice_spacing_mm)

    @property
    def window_start(self) -> int:
        """First source slice of the central extent (negative: padded before the volume)."""
        diff = int(self.depth) - self.n_window
        return math.ceil(diff / 2) if diff >= 0 else -math.ceil(-diff / 2)

    def grid_spacing(self, slice_spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Voxel size ``(slice, row, column)`` of the evaluation grid, given the slice file's."""
        if self.mode == "reference":
            return (float(self.slice_spacing_mm), float(slice_spacing[1]), float(slice_spacing[2]))
        return tuple(float(s) for s in slice_spacing)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What metrics and threshold files record: the mode and, for ``reference``, its grid."""
        if self.mode == "brain_mask":
            return {"mode": "brain_mask", "region": "eroded brain mask"}
        return {
            **self.to_dict(),
            "region": "every voxel of the reference grid (ignore labels excepted)",
            "n_slices": self.n_slices,
            "window": [self.window_start, self.window_start + self.n_window],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> EvaluationConfig:
        return cls(**(values or {}))


@dataclass
class EvaluatedVolume:
    """One subject on the evaluation grid, post-processed.

    Attributes:
        subject: subject id.
        post_map: float32 ``[S, H, W]``, the post-processed map.
        region: bool ``[S, H, W]``, the evaluated voxels.
        brain: bool ``[S, H, W]``, the eroded brain mask (where the map is kept).
        image: bool ``[S, H, W]``, every voxel of the grid but ``ignore`` ones.
        lesion: bool ``[S, H, W]``, ground truth on the grid (metrics clip it to ``region``).
        slice_region: bool ``[S, H, W]``, the voxels a slice score summarises.
        slice_labels: bool ``[S]``, lesion slice.
        slice_scored: bool ``[S]``, slices that enter slice-level detection.
        absent_slices: reference mode: source slices of the central extent that the slice
            file does not hold (0 in ``brain_mask`` mode).
    """

    subject: str
    post_map: np.ndarray
    region: np.ndarray
    brain: np.ndarray
    image: np.ndarray
    lesion: np.ndarray
    slice_region: np.ndarray
    slice_labels: np.ndarray
    slice_scored: np.ndarray
    absent_slices: int = 0


def _ignore(vol: SubjectVolume) -> np.ndarray:
    return np.zeros_like(vol.brainmask) if vol.ignore is None else np.asarray(vol.ignore, bool)


def _eroded(brainmask: np.ndarray, postprocess: PostprocessConfig) -> np.ndarray:
    """The eroded brain mask, also when ``apply_brainmask`` is off: in ``reference`` mode the
    healthy-FPR denominator ``brain`` means the brain either way (in ``brain_mask`` mode it
    is the evaluated region, as before the setting existed)."""
    return erode_brainmask(brainmask, replace(postprocess, apply_brainmask=True))


def reference_positions(cfg: EvaluationConfig) -> np.ndarray:
    """Window positions ``p_j = (j + 1/2) f - 1/2`` of the reference slices (module doc)."""
    factor = cfg.slice_spacing_mm / float(cfg.source_spacing_mm)
    return (np.arange(cfg.n_slices) + 0.5) * factor - 0.5


def resample_slice_axis(volume: np.ndarray, positions: np.ndarray, *, labels: bool) -> np.ndarray:
    """Sample ``volume [N, H, W]`` at fractional slice ``positions``.

    Linear interpolation between the two neighbouring slices, or (``labels``) the nearest
    slice with ties to the upper one; positions beyond the ends take the end slice.
    """
    n = volume.shape[0]
    if labels:
        index = np.clip(np.floor(positions + 0.5).astype(np.int64), 0, n - 1)
        return volume[index]
    low = np.floor(positions).astype(np.int64)
    weight = (positions - low).astype(np.float32)[:, None, None]
    lo = np.clip(low, 0, n - 1)
    hi = np.clip(low + 1, 0, n - 1)
    data = volume.astype(np.float32, copy=False)
    return (1.0 - weight) * data[lo] + weight * data[hi]


def central_window(vol: SubjectVolume, cfg: EvaluationConfig) -> dict[str, Any]:
    """The central extent of the subject's whole slice axis (steps 1-2 of the module doc).

    Returns:
        ``{"anomaly_map", "brain", "seg", "ignore"}`` arrays ``[n_window, H, W]`` and
        ``"absent"``, the window slices the slice file does not hold.

    Raises:
        InputError: a ``slice_index`` outside ``0 .. depth - 1``.
    """
    depth = int(cfg.depth)
    index = np.asarray(vol.slice_index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= depth):
        raise InputError(
            f"subject {vol.subject}: slice_index {index.min()}..{index.max()} outside the "
            f"cropped volume's {depth} slices (evaluation.mode reference takes "
            "preprocess.crop_shape[2] as the slice-axis length)"
        )
    start, n = cfg.window_start, cfg.n_window
    source = np.arange(start, start + n)  # source slice of each window slice
    held = np.zeros(n, dtype=bool)
    where = np.full(n, -1, dtype=np.int64)
    row_of = {int(s): i for i, s in enumerate(index) if vol.present[i]}
    for w, s in enumerate(source):
        if int(s) in row_of:
            held[w] = True
            where[w] = row_of[int(s)]
    inside = (source >= 0) & (source < depth)

    def take(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros((n, *values.shape[1:]), dtype=dtype)
        out[held] = values[where[held]]
        return out

    brain = np.asarray(vol.brainmask, bool) | _ignore(vol)
    return {
        "anomaly_map": take(vol.anomaly_map, np.float32),
        "brain": take(brain, bool),
        "seg": take(np.asarray(vol.seg, bool), bool),
        "ignore": take(_ignore(vol), bool),
        "absent": int((inside & ~held).sum()),
    }


def evaluate_volume(
    vol: SubjectVolume, postprocess: PostprocessConfig, evaluation: EvaluationConfig
) -> EvaluatedVolume:
    """Post-process one subject on the evaluation grid of ``evaluation`` (module doc)."""
    if evaluation.mode == "brain_mask":
        region = erode_brainmask(vol.brainmask, postprocess)
        return EvaluatedVolume(
            subject=vol.subject,
            post_map=postprocess_map(vol.anomaly_map, vol.brainmask, postprocess),
            region=region,
            brain=region,
            image=~_ignore(vol),
            lesion=np.asarray(vol.seg, bool),
            slice_region=region,
            slice_labels=np.asarray(vol.label) > 0,
            slice_scored=np.asarray(vol.present, bool),
        )
    window = central_window(vol, evaluation)
    positions = reference_positions(evaluation)
    amap = resample_slice_axis(window["anomaly_map"], positions, labels=False)
    brain = resample_slice_axis(window["brain"], positions, labels=True)
    seg = resample_slice_axis(window["seg"], positions, labels=True)
    ignore = resample_slice_axis(window["ignore"], positions, labels=True)
    scored_brain = brain & ~ignore
    post = postprocess_map(amap, scored_brain, postprocess, remask=False)
    image = ~ignore
    return EvaluatedVolume(
        subject=vol.subject,
        post_map=post,
        region=image,
        brain=_eroded(scored_brain, postprocess),
        image=image,
        lesion=seg,
        slice_region=scored_brain,
        slice_labels=seg.any(axis=(1, 2)),
        slice_scored=np.ones(seg.shape[0], dtype=bool),
        absent_slices=window["absent"],
    )
