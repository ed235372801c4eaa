"""Cut preprocessed volumes into the axial slices of the slice file.

Rules applied to every subject, in this order:

1. **One grid.** Every sequence, the brain mask and the segmentation must share shape and
   affine (checked against the first sequence); the volumes are then reoriented to the closest
   canonical RAS orientation (a no-op for the preprocessed MNI volumes, which are RAS already),
   so ``slice_index`` is the index along the superior (last) axis of the RAS volume.
2. **Brain content.** Axial slice ``k`` is kept when its brain-mask area ``a_k`` (voxels with
   a non-zero mask) satisfies ``a_k > 0`` and ``a_k >= min_brain_fraction * max_j a_j``: the
   threshold is relative to the subject's largest brain slice, so it does not depend on voxel
   size or head size. ``min_brain_fraction`` is in ``[0, 1]``; slices without brain are always
   dropped.
3. **Orientation.** A kept slice ``vol[:, :, k]`` (axes R, A) becomes a 2D array ``[H, W]``
   with rows running anterior to posterior and columns running from the subject's left to
   right (``np.rot90`` of the RAS slice): shown with ``imshow`` anterior is up and the
   subject's left is on the viewer's left (neurological convention).
4. **Label convention.** With ``lesion_labels`` given, segmentation values outside it are
   set to 0 in ``seg``; values in ``ignore_labels`` (WMH 2017's "other pathology") go to a
   separate ``ignore`` mask, excluded from scoring. Lesion sub-labels (BraTS 1/2/4) are kept.
5. **Square and resize.** The slice is zero-padded symmetrically to a square, then resized to
   ``size x size``: images bilinearly with anti-aliasing (``torch.nn.functional.interpolate``,
   ``antialias=True``), brain mask and segmentation with ``nearest-exact`` so label values are
   preserved. Image intensities are set to 0 outside the resized brain mask, keeping the
   contract "0 outside the brain".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import brainuad
from brainuad.errors import InputError
from brainuad.io.nifti import check_same_grid, load_nifti
from brainuad.slices.hdf5 import SliceWriter

SLICE_ORIENTATION = "axial; rows anterior->posterior, columns left->right (neurological)"


@dataclass(frozen=True)
class SubjectSlices:
    """The kept axial slices of one subject, ready for the slice file.

    Attributes:
        images: float32 ``[n, C, size, size]``, channels in the requested sequence order.
        brainmask: uint8 ``[n, size, size]``, 1 inside the brain.
        seg: uint8 ``[n, size, size]``, lesion labels, 0 where healthy.
        slice_index: int32 ``[n]``, axial index in the RAS volume (increasing).
        ignore: uint8 ``[n, size, size]``, 1 where the labels are neither lesion nor
            healthy (``ignore_labels``), or None when the dataset has no such labels.
    """

    images: np.ndarray
    brainmask: np.ndarray
    seg: np.ndarray
    slice_index: np.ndarray
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.slice_index.size)


def _oriented_slices(volume: np.ndarray) -> np.ndarray:
    """RAS volume ``[X, Y, Z]`` -> axial slices ``[Z, Y, X]``, rows anterior first."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, :])


def _pad_square(stack: np.ndarray) -> np.ndarray:
    """Zero-pad the last two axes of ``stack`` symmetrically to a square."""
    height, width = stack.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(0, 0)] * (stack.ndim - 2) + [(top, side - height - top), (left, side - width - left)]
    return np.pad(stack, pad)


def _resize(stack: np.ndarray, size: int, *, labels: bool) -> np.ndarray:
    """Resize ``[n, C, S, S]`` to ``[n, C, size, size]``; nearest for labels, else bilinear."""
    if stack.shape[-1] == size:
        return stack
    # torch is imported here, not at module level: the metrics jobs read
    # `slice_voxel_spacing` from this module and need no torch (~3 s per job).
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    if labels:
        out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return out.numpy()


def _label_volume(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """Integer labels of a segmentation as uint8, refusing values that are not 0..255."""
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise InputError(f"{path}: segmentation has non-integer values, expected labels 0..255")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise InputError(
            f"{path}: segmentation values span {data.min()}..{data.max()}, expected 0..255"
        )
    return data.astype(np.uint8)


def extract_subject_slices(
    *,
    images: Mapping[str, str | os.PathLike],
    brainmask: str | os.PathLike,
    seg: str | os.PathLike,
    sequences: Sequence[str],
    size: int,
    min_brain_fraction: float,
    lesion_labels: Sequence[int] = (),
    ignore_labels: Sequence[int] = (),
) -> SubjectSlices:
    """Load one subject's volumes and return its kept, oriented, resized axial slices.

    Args:
        images: sequence name -> NIfTI path; must contain every name in ``sequences``.
        brainmask: NIfTI brain mask (non-zero inside the brain).
        seg: NIfTI lesion labels (0 where healthy, integers up to 255).
        sequences: channel order of ``images`` in the output.
        size: output height and width in pixels.
        min_brain_fraction: keep slices whose brain area is at least this fraction of the
            subject's largest brain slice area (see the module docstring).
        lesion_labels: label values that are lesion; empty keeps every non-zero value.
        ignore_labels: label values excluded from lesion and scoring (an ``ignore`` mask).

    Raises:
        InputError: a sequence is missing, a file is unreadable, volumes are on different
            grids (naming the offending file), the mask is empty, or an argument is invalid.
    """
    sequences = list(sequences)
    if not sequences:
        raise InputError("sequences: expected at least one sequence name, got none")
    missing = [name for name in sequences if name not in images]
    if missing:
        raise InputError(
            f"images: missing sequence(s) {missing}; given {sorted(images)} (brainmask {brainmask})"
        )
    if int(size) != size or size < 1:
        raise InputError(f"size: expected a positive integer, got {size!r}")
    if not 0.0 <= float(min_brain_fraction) <= 1.0:
        raise InputError(
            f"min_brain_fraction: expected a value in [0, 1], got {min_brain_fraction}"
        )
    size = int(size)

    paths = [Path(images[name]) for name in sequences] + [Path(brainmask), Path(seg)]
    loaded = [load_nifti(path) for path in paths]
    for path, img in zip(paths[1:], loaded[1:], strict=True):
        check_same_grid(paths[0], loaded[0], path, img)
    loaded = [nib.as_closest_canonical(img) for img in loaded]

    image_vols = [np.asanyarray(img.dataobj).astype(np.float32) for img in loaded[:-2]]
    mask_vol = np.asanyarray(loaded[-2].dataobj) > 0
    seg_vol = _label_volume(paths[-1], loaded[-1])
    ignore_vol = np.isin(seg_vol, list(ignore_labels)).astype(np.uint8) if ignore_labels else None
    if lesion_labels:
        seg_vol = np.where(np.isin(seg_vol, list(lesion_labels)), seg_vol, 0).astype(np.uint8)

    area = mask_vol.sum(axis=(0, 1))
    if area.max() == 0:
        raise InputError(f"{paths[-2]}: brain mask is empty")
    keep = np.flatnonzero((area > 0) & (area >= float(min_brain_fraction) * area.max()))

    image_stack = np.stack([_oriented_slices(vol[:, :, keep]) for vol in image_vols], axis=1)
    mask_stack = _oriented_slices(mask_vol[:, :, keep].astype(np.uint8))[:, None]
    seg_stack = _oriented_slices(seg_vol[:, :, keep])[:, None]

    image_out = _resize(_pad_square(image_stack), size, labels=False)
    mask_out = _resize(_pad_square(mask_stack), size, labels=True)[:, 0].astype(np.uint8)
    seg_out = _resize(_pad_square(seg_stack), size, labels=True)[:, 0].astype(np.uint8)
    image_out = np.where(mask_out[:, None] > 0, image_out, 0.0).astype(np.float32)
    ignore_out = None
    if ignore_vol is not None:
        ignore_stack = _oriented_slices(ignore_vol[:, :, keep])[:, None]
        ignore_out = _resize(_pad_square(ignore_stack), size, labels=True)[:, 0].astype(np.uint8)
    return SubjectSlices(
        images=image_out,
        brainmask=mask_out,
        seg=seg_out,
        slice_index=keep.astype(np.int32),
        ignore=ignore_out,
    )


def build_slice_file(
    *,
    out_path: str | os.PathLike,
    subjects: Mapping[str, Mapping[str, str | os.PathLike]],
    sequences: Sequence[str],
    size: int,
    min_brain_fraction: float,
    attrs: Mapping[str, Any],
    min_lesion_pixels: int = 1,
    lesion_labels: Sequence[int] = (),
    ignore_labels: Sequence[int] = (),
) -> dict[str, Any]:
    """Write the slice file of one dataset, subjects in sorted order, atomically.

    Args:
        out_path: the ``.h5`` file to write.
        subjects: subject id -> {sequence name: path, ..., "brainmask": path, "seg": path}.
        sequences: channel order, stored in ``attrs["sequences"]``.
        size: slice height and width.
        min_brain_fraction: see :func:`extract_subject_slices`.
        attrs: extra file attributes (preprocessing config, dataset name, ...), none of
            :data:`brainuad.slices.hdf5.RESERVED_ATTRS`. The slice settings (``slice_size``,
            ``min_brain_fraction``, ``slice_orientation``) and ``brainuad_version`` are
            recorded as well.
        min_lesion_pixels: a slice is labelled a lesion slice (``label`` 1) when it has at
            least this many lesion pixels (recorded in the file).
        lesion_labels, ignore_labels: the dataset's label convention (see
            :func:`extract_subject_slices`); with ignore labels the file gets an ``ignore``
            dataset.

    Returns:
        ``{"n_subjects", "n_slices", "n_lesion_slices", "per_subject": {id: {"n_slices",
        "n_lesion_slices"}}}``.
    """
    if not subjects:
        raise InputError(f"{out_path}: no subjects given for the slice file")
    file_attrs = {"brainuad_version": brainuad.__version__, **attrs}
    file_attrs.update(
        slice_size=int(size),
        min_brain_fraction=float(min_brain_fraction),
        slice_orientation=SLICE_ORIENTATION,
    )
    per_subject: dict[str, dict[str, int]] = {}
    with SliceWriter(
        out_path,
        sequences=sequences,
        height=size,
        width=size,
        attrs=file_attrs,
        min_lesion_pixels=min_lesion_pixels,
        with_ignore=bool(ignore_labels),
    ) as writer:
        for subject in sorted(subjects):
            files = subjects[subject]
            missing = [key for key in ("brainmask", "seg") if key not in files]
            if missing:
                raise InputError(f"subject {subject}: missing {missing}; given {sorted(files)}")
            images = {key: path for key, path in files.items() if key not in ("brainmask", "seg")}
            try:
                slices = extract_subject_slices(
                    images=images,
                    brainmask=files["brainmask"],
                    seg=files["seg"],
                    sequences=sequences,
                    size=size,
                    min_brain_fraction=min_brain_fraction,
                    lesion_labels=lesion_labels,
                    ignore_labels=ignore_labels,
                )
            except InputError as err:
                raise InputError(f"subject {subject}: {err}") from err
            writer.append_subject(
                subject,
                slices.images,
                slices.brainmask,
                slices.seg,
                slices.slice_index,
                ignore=slices.ignore,
            )
            lesion = int(((slices.seg > 0).sum(axis=(1, 2)) >= min_lesion_pixels).sum())
            per_subject[subject] = {"n_slices": len(slices), "n_lesion_slices": lesion}
    return {
        "n_subjects": len(per_subject),
        "n_slices": sum(s["n_slices"] for s in per_subject.values()),
        "n_lesion_slices": sum(s["n_lesion_slices"] for s in per_subject.values()),
        "per_subject": per_subject,
    }


def slice_voxel_spacing(
    *, resolution_mm: float, volume_shape: Sequence[int], size: int
) -> tuple[float, float, float]:
    """Voxel size ``(slice, row, column)`` in mm of slices extracted by this module.

    The in-plane ``volume_shape[:2]`` is padded to its larger side, then resized to
    ``size``, so one pixel spans ``resolution_mm * max(shape[:2]) / size`` mm; slices keep
    the volume's ``resolution_mm`` spacing.
    """
    pixel = resolution_mm * max(volume_shape[0], volume_shape[1]) / size
    return (float(resolution_mm), float(pixel), float(pixel))
