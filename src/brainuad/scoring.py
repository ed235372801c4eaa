"""Scoring: run a trained method over rows of a slice file and write a scores file.

Maps are raw (no masking, filtering or thresholding): post-processing belongs to evaluation,
so one scores file serves every post-processing variant. A method reads the sequences it
names (``inputs``) and may run at its own size; its maps are resampled back to the slice
file's grid, and both are recorded in the scores file (attributes ``inputs``,
``method_size``), which the evaluation reads to compare reconstructions with the right
channels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from brainuad.errors import InputError
from brainuad.io.scores import ScoresWriter
from brainuad.methods import Method, build_method  # the import registers every method
from brainuad.provenance import provenance
from brainuad.slices.hdf5 import SliceFile
from brainuad.slices.resize import resize_image, resize_map, resize_mask
from brainuad.slices.splits import read_splits, subjects_in
from brainuad.training.device import resolve_device


def score_split(
    method: Method,
    *,
    slice_path: str | os.PathLike,
    rows: np.ndarray | Sequence[int],
    out_path: str | os.PathLike,
    batch_size: int,
    device: str = "auto",
    attrs: dict[str, Any],
    inputs: Sequence[str] | None = None,
    size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``rows`` of the slice file (in the given order) and write ``out_path``.

    Args:
        method: a trained method; moved to ``device`` and put in eval mode.
        slice_path: the slice file the rows index.
        rows: slice-file rows; the scores file keeps this order, row for row.
        out_path: the scores file to write (atomically).
        batch_size: slices per forward pass. Methods that draw noise seed it per batch, so
            the same batch size reproduces the same maps.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        attrs: file attributes (``method``, ``fold``, ``dataset``, ``split``, ...); a
            ``provenance`` record and the method's ``hparams`` are added unless given.
        inputs: the sequences the method reads, in its channel order (default: all).
        size: the method's working size (default: the slice size); slices are resampled
            to it and the maps back to the slice grid. Reconstructions stay at the method's
            size when it differs from the slice size (they are then not stored).
        progress: show a tqdm progress bar.

    Returns:
        A summary: out_path, rows, batch_size, device, seconds, has_reconstruction.
    """
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}, expected an integer ≥ 1")
    slices = SliceFile(slice_path)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise InputError(f"rows for {slice_path}: expected a 1-D array, got shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= len(slices)):
        raise InputError(
            f"{slice_path}: rows must lie in [0, {len(slices)}), got {rows.min()} … {rows.max()}"
        )
    _, _, height, width = slices.shape
    channel_index = slices.channel_indices(inputs)
    sequences = [slices.sequences[i] for i in channel_index]
    size = None if size is None or int(size) == width == height else int(size)
    # A reconstruction at another size than the slice grid has no voxel-wise counterpart.
    keep_reconstruction = method.has_reconstruction and size is None
    torch_device = resolve_device(device)
    method.to(torch_device)
    method.eval()
    file_attrs = {
        "method": method.name,
        "hparams": method.hparams,
        "provenance": provenance(),
        "batch_size": batch_size,
        "inputs": sequences,
        "method_size": size or width,
    } | dict(attrs)

    start = time.perf_counter()
    with (
        ScoresWriter(
            out_path,
            rows=rows,
            height=height,
            width=width,
            channels=len(sequences) if keep_reconstruction else None,
            attrs=file_attrs,
        ) as writer,
        tqdm(
            total=int(rows.size),
            disable=not progress,
            desc=f"score {method.name}",
            unit="slice",
            dynamic_ncols=True,
        ) as bar,
    ):
        for begin in range(0, rows.size, batch_size):
            batch = slices.read(rows[begin : begin + batch_size])
            images = torch.from_numpy(batch["images"][:, channel_index])
            brainmask = torch.from_numpy(batch["brainmask"][:, None].astype(np.float32))
            if size is not None:
                images, brainmask = resize_image(images, size), resize_mask(brainmask, size)
            out = method.score(images.to(torch_device), brainmask.to(torch_device))
            _check_finite_maps(out.anomaly_map, batch, method.name, file_attrs, slice_path)
            anomaly_map = resize_map(out.anomaly_map.float().cpu(), height, width)
            reconstruction = out.reconstruction if keep_reconstruction else None
            writer.write(
                anomaly_map.numpy(),
                None if reconstruction is None else reconstruction.float().cpu().numpy(),
            )
            bar.update(images.shape[0])
    slices.close()
    return {
        "out_path": str(out_path),
        "rows": int(rows.size),
        "batch_size": batch_size,
        "device": str(torch_device),
        "seconds": time.perf_counter() - start,
        "has_reconstruction": keep_reconstruction,
        "inputs": sequences,
        "method_size": size or width,
    }


def _check_finite_maps(
    anomaly_map: torch.Tensor,
    batch: dict[str, np.ndarray],
    method: str,
    attrs: dict[str, Any],
    slice_path: str | os.PathLike,
) -> None:
    """Raise InputError naming method, fold, dataset, subject and slice of the first
    non-finite map in the batch (``anomaly_map`` ``[B, H, W]``)."""
    finite = torch.isfinite(anomaly_map).flatten(1).all(dim=1).cpu().numpy()
    if finite.all():
        return
    first = int(np.flatnonzero(~finite)[0])
    raise InputError(
        f"method {method!r}, fold {attrs.get('fold', '?')}, dataset "
        f"{attrs.get('dataset', '?')!r}: anomaly map of subject {batch['subject'][first]!r}, "
        f"slice_index {int(batch['slice_index'][first])} (row {int(batch['row'][first])} of "
        f"{slice_path}) holds NaN or infinite values ({int((~finite).sum())} of "
        f"{finite.size} maps in this batch); the method diverged or its weights are not finite"
    )


def score_dataset_split(
    *,
    model_path: str | os.PathLike | None,
    slice_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    fold: int,
    split: str,
    out_path: str | os.PathLike,
    batch_size: int,
    device: str = "auto",
    attrs: dict[str, Any] | None = None,
    inputs: Sequence[str] | None = None,
    size: int | None = None,
    build: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every slice of the subjects in ``split`` of fold ``fold``: rows in slice-file
    order, written to ``out_path``. One split of :func:`score_dataset_splits`."""
    return score_dataset_splits(
        model_path=model_path,
        slice_path=slice_path,
        splits_path=splits_path,
        fold=fold,
        out_paths={split: out_path},
        batch_size=batch_size,
        device=device,
        attrs=attrs,
        inputs=inputs,
        size=size,
        build=build,
    )[split]


def score_dataset_splits(
    *,
    model_path: str | os.PathLike | None,
    slice_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    fold: int,
    out_paths: Mapping[str, str | os.PathLike],
    batch_size: int,
    device: str = "auto",
    attrs: dict[str, Any] | None = None,
    inputs: Sequence[str] | None = None,
    size: int | None = None,
    build: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score the splits of one dataset and fold (what ``score_dataset`` runs): for each
    ``split → out_path`` of ``out_paths``, every slice of that split's subjects, in
    slice-file order. The method is loaded once, from ``model_path``, or, for a method
    without trained stages, built from ``build`` (``{"implementation": name, "model":
    hyperparameters}``). Every split must have a subject (checked before any scoring).

    Returns:
        split → the summary of :func:`score_split`.
    """
    table = read_splits(splits_path)
    subjects_by_split = {split: subjects_in(table, fold=fold, split=split) for split in out_paths}
    for split, subjects in subjects_by_split.items():
        if not subjects:
            raise InputError(f"{splits_path}: fold {fold} has no subject in split {split!r}")
    method = _scoring_method(model_path, build, n_inputs=len(inputs) if inputs else None)
    slices = SliceFile(slice_path)
    summaries = {}
    for split, out_path in out_paths.items():
        subjects = subjects_by_split[split]
        record = {"fold": fold, "split": split, "subjects": subjects, "model": str(model_path)}
        record.update(attrs or {})
        summaries[split] = score_split(
            method,
            slice_path=slice_path,
            rows=slices.rows_for_subjects(subjects),
            out_path=out_path,
            batch_size=batch_size,
            device=device,
            attrs=record,
            inputs=inputs,
            size=size,
        )
    return summaries


def _scoring_method(
    model_path: str | os.PathLike | None, build: dict[str, Any] | None, n_inputs: int | None
) -> Method:
    if (model_path is None) == (build is None):
        raise InputError("scoring needs either a trained model file or a training-free method")
    if model_path is not None:
        return Method.load(model_path)
    hparams = dict(build.get("model") or {})
    if n_inputs is not None:
        hparams.setdefault("in_channels", n_inputs)
    method = build_method(build["implementation"], **hparams)
    if method.stages:
        raise InputError(
            f"method {build['implementation']!r} has trained stages; score it from its model file"
        )
    return method
