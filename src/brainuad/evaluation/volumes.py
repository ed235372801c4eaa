"""Reassemble per-subject 3D volumes from a slice file and a scores file.

Evaluation is per volume (as in cDDPM), but both files store one row per axial slice.
:func:`iter_subject_volumes` groups the scored rows by subject and stacks them in
``slice_index`` order, one subject at a time, so memory stays at one volume.

Slices a subject lacks between its lowest and highest ``slice_index`` (the slicer may
drop slices without brain) are filled with zeros and an empty brain mask, so that the 3D
operations of post-processing (median filter, connected components) see true neighbours;
``present`` marks the slices that exist in the files.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np

from brainuad.errors import InputError
from brainuad.io.scores import ScoresFile
from brainuad.slices.hdf5 import SliceFile


@dataclass
class SubjectVolume:
    """One subject's slices stacked along axis 0 in ``slice_index`` order.

    Attributes:
        subject: subject identifier.
        anomaly_map: float32 ``[S, H, W]``, the raw anomaly map.
        brainmask: bool ``[S, H, W]``, the scored voxels: the brain less any ``ignore``
            voxels of the slice file (WMH 2017 label 2).
        seg: bool ``[S, H, W]``, the binary lesion mask (``seg > 0``).
        slice_index: int ``[S]``, consecutive axial indices.
        rows: int64 ``[S]``, row in the slice file (-1 where the slice is missing).
        present: bool ``[S]``, the slice exists in the files.
        label: uint8 ``[S]``, slice label from the slice file (0 where missing).
        image: float32 ``[S, C, H, W]`` when requested, else None.
        reconstruction: float32 ``[S, C, H, W]`` when requested and stored, else None.
        ignore: bool ``[S, H, W]``, the ``ignore`` voxels of the slice file (left out of
            ``brainmask``), or None when the slice file has none.
    """

    subject: str
    anomaly_map: np.ndarray
    brainmask: np.ndarray
    seg: np.ndarray
    slice_index: np.ndarray
    rows: np.ndarray
    present: np.ndarray
    label: np.ndarray
    image: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    ignore: np.ndarray | None = None

    @property
    def has_lesion(self) -> bool:
        return bool(self.seg.any())


def _open(obj, cls):
    return obj if isinstance(obj, cls) else cls(obj)


def iter_subject_volumes(
    slice_file: SliceFile | str | os.PathLike,
    scores_file: ScoresFile | str | os.PathLike,
    with_images: bool = False,
    with_reconstruction: bool = False,
    subjects: Collection[str] | None = None,
) -> Iterator[SubjectVolume]:
    """Yield one :class:`SubjectVolume` per subject scored in ``scores_file``.

    Subjects come in order of their first row in the scores file. Rows within the scores
    file may be in any order.

    Args:
        subjects: only these subjects (every one must be scored); nothing of the others is
            read. None: every scored subject.

    Raises:
        InputError: rows outside the slice file, map size unlike the slices, a NaN or
            infinite map value, one subject with the same ``slice_index`` twice, or a
            requested subject not scored.
    """
    slices = _open(slice_file, SliceFile)
    scores = _open(scores_file, ScoresFile)
    n_rows = slices.shape[0]
    rows = np.asarray(scores.rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise InputError(
            f"{scores.path}: field 'row' must index {slices.path} (0..{n_rows - 1}), "
            f"got range {rows.min()}..{rows.max()}"
        )
    scored = slices.subjects[rows]
    _, first = np.unique(scored, return_index=True)
    in_order = [str(subject) for subject in scored[np.sort(first)]]
    if subjects is not None:
        wanted = {str(subject) for subject in subjects}
        missing = sorted(wanted - set(in_order))
        if missing:
            raise InputError(f"{scores.path}: subject(s) {missing[:5]} not scored in this file")
        in_order = [subject for subject in in_order if subject in wanted]
    for subject in in_order:
        positions = np.flatnonzero(scored == subject)
        yield _assemble(slices, scores, subject, positions, with_images, with_reconstruction)


def _assemble(
    slices: SliceFile,
    scores: ScoresFile,
    subject: str,
    positions: np.ndarray,
    with_images: bool,
    with_reconstruction: bool,
) -> SubjectVolume:
    want_reco = with_reconstruction and scores.has_reconstruction
    scored = scores.read(positions, reconstruction=want_reco)
    rows = scored["row"]
    data = slices.read(rows)
    if with_images and scores.inputs is not None:
        # Compare reconstructions with the channels the method read, in its order.
        data["images"] = data["images"][:, slices.channel_indices(scores.inputs)]
    amap = scored["anomaly_map"]
    if amap.shape[1:] != data["brainmask"].shape[1:]:
        raise InputError(
            f"{scores.path}: field 'anomaly_map' has slices {amap.shape[1:]}, "
            f"expected {data['brainmask'].shape[1:]} as in {slices.path}"
        )
    index = data["slice_index"].astype(np.int64)
    finite = np.isfinite(amap).reshape(amap.shape[0], -1).all(axis=1)
    if not finite.all():
        attrs = scores.attrs
        raise InputError(
            f"{scores.path}: anomaly map of method {attrs.get('method', '?')!r}, fold "
            f"{attrs.get('fold', '?')}, dataset {attrs.get('dataset', '?')!r}, subject "
            f"{subject!r}, slice_index {index[~finite][:5].tolist()} holds NaN or infinite "
            "values; evaluation takes finite maps only (delete the file and rerun snakemake "
            "to rescore it)"
        )
    if np.unique(index).size != index.size:
        raise InputError(
            f"{slices.path}: subject {subject} has a repeated 'slice_index' among the rows "
            f"scored in {scores.path}"
        )
    lo, hi = int(index.min()), int(index.max())
    depth = hi - lo + 1
    at = index - lo  # position of each read row in the contiguous volume

    def stack(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros((depth, *values.shape[1:]), dtype=dtype)
        out[at] = values
        return out

    brain = data["brainmask"] > 0
    ignore = None
    if "ignore" in data:  # voxels of an ignore label (WMH's "other pathology") are not scored
        ignore = data["ignore"] > 0
        brain &= ~ignore
    full_rows = np.full(depth, -1, dtype=np.int64)
    full_rows[at] = rows
    present = np.zeros(depth, dtype=bool)
    present[at] = True
    return SubjectVolume(
        subject=subject,
        anomaly_map=stack(amap, np.float32),
        brainmask=stack(brain, bool),
        seg=stack(data["seg"] > 0, bool),
        slice_index=np.arange(lo, hi + 1, dtype=np.int64),
        rows=full_rows,
        present=present,
        label=stack(data["label"], np.uint8),
        image=stack(data["images"], np.float32) if with_images else None,
        reconstruction=stack(scored["reconstruction"], np.float32) if want_reco else None,
        ignore=None if ignore is None else stack(ignore, bool),
    )
