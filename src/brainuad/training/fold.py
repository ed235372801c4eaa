"""Train one method on one fold of the healthy cohort: what the ``train_model`` rule runs.

Reads the fold's healthy train/val subjects from the splits file, builds the method from
the config's hyperparameters, runs the shared resumable loop with its checkpoint in a
folder outside the rule's outputs (so a killed job resumes), then writes the model, the
training log and a ``config.json`` that records which subjects it saw.

The checkpoint records a fingerprint of the training slices, so that a checkpoint made on
other data (a rebuilt slice file, other splits) is refused instead of being resumed or, if
finished, returned as if it had been trained on the new data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path, write_text_atomic
from brainuad.methods import build_method
from brainuad.provenance import provenance, seed_everything
from brainuad.slices.hdf5 import SliceDataset, SliceFile
from brainuad.slices.splits import read_splits, subjects_in
from brainuad.training.loop import TrainingRun, train

PathLike = str | os.PathLike

# Slices whose pixels enter the fingerprint: enough to notice a re-normalised or
# re-extracted file without reading the whole image stack.
_FINGERPRINT_IMAGE_ROWS = 3


def training_data_fingerprint(dataset: SliceDataset) -> str:
    """A cheap sha256 identity of the slices ``dataset`` trains on.

    Covers the slice file's size, shape and sequences, the rows used (in order) with their
    subject and axial slice index, and the pixels of the first, middle and last of those
    rows. The whole image stack is not hashed: it can be many gigabytes.
    """
    slices, rows = dataset.slices, np.asarray(dataset.rows, dtype=np.int64)
    digest = hashlib.sha256()
    header = {
        "file_bytes": slices.path.stat().st_size,
        "shape": list(slices.shape),
        "sequences": slices.sequences,
        "subjects": sorted(set(slices.subjects[rows].tolist())),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(rows.astype("<i8").tobytes())
    digest.update("\0".join(slices.subjects[rows].tolist()).encode())
    digest.update(slices.slice_indices[rows].astype("<i8").tobytes())
    if rows.size:
        sample = np.unique(np.linspace(0, rows.size - 1, _FINGERPRINT_IMAGE_ROWS).astype(int))
        digest.update(np.ascontiguousarray(slices.read(rows[sample])["images"]).tobytes())
    return digest.hexdigest()


def train_fold(
    *,
    method_name: str,
    model_hparams: dict[str, Any],
    training: dict[str, Any],
    slice_path: PathLike,
    splits_path: PathLike,
    fold: int,
    checkpoint_dir: PathLike,
    out_model: PathLike,
    out_log: PathLike,
    out_config: PathLike,
    seed: int,
    device: str = "auto",
    study_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``method_name`` on fold ``fold``'s healthy training slices.

    ``in_channels`` defaults to the slice file's number of sequences; a different value in
    ``model_hparams`` is refused. The checkpoint in ``checkpoint_dir`` is resumed only if
    it was made with the same settings and the same training slices
    (:func:`training_data_fingerprint`). Returns the loop's summary.
    """
    slices = SliceFile(slice_path)
    channels = len(slices.sequences)
    hparams = dict(model_hparams)
    if hparams.setdefault("in_channels", channels) != channels:
        raise InputError(
            f"methods.{method_name}.model.in_channels: {hparams['in_channels']}, but "
            f"{slice_path} has {channels} sequence(s) {slices.sequences}"
        )
    splits = read_splits(splits_path)
    train_subjects = subjects_in(splits, fold=fold, split="train")
    val_subjects = subjects_in(splits, fold=fold, split="val")
    seed_everything(seed)
    method = build_method(method_name, **hparams)
    checkpoint_dir = Path(checkpoint_dir)
    run = TrainingRun(
        checkpoint_path=checkpoint_dir / "last.pt",
        log_path=checkpoint_dir / "train_log.csv",
        seed=seed,
        device=device,
        progress=progress,
        **training,
    )
    train_dataset = SliceDataset(slice_path, subjects=train_subjects)
    summary = train(
        method,
        train_dataset,
        SliceDataset(slice_path, subjects=val_subjects) if val_subjects else None,
        run,
        data_fingerprint=training_data_fingerprint(train_dataset),
    )
    method.to("cpu").save(out_model)
    with atomic_path(out_log) as tmp:
        shutil.copyfile(run.log_path, tmp)
    record = {
        "method": method_name,
        "fold": fold,
        "hparams": method.hparams,
        "training": training,
        "trained_on": {
            "slices": str(slice_path),
            "splits": str(splits_path),
            "train_subjects": train_subjects,
            "val_subjects": val_subjects,
            "supervision": method.supervision,
        },
        "summary": summary,
        "provenance": provenance(study_config),
    }
    write_text_atomic(out_config, json.dumps(record, indent=2, default=str))
    return summary
