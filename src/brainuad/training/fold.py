"""Train one stage of one method on one fold: what the ``train_model`` and ``train_stage``
rules run.

Reads the fold's training and validation subjects of each training cohort from its splits
file (the healthy cohort: the fold's ``train``/``val``; a lesion cohort, for weakly supervised
methods: its ``train``/``val``, the same in every fold), builds the method from the config's
hyperparameters, loads the modules of the earlier stages it consumes, runs the shared
resumable loop with its checkpoint in a folder outside the rule's outputs (so a killed job
resumes), then writes the stage's model file, the training log and a config record of what
it read.

The checkpoint records a fingerprint of the training slices, so that a checkpoint made on
other data (a rebuilt slice file, other splits) is refused instead of being resumed or, if
finished, returned as if it had been trained on the new data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path, write_text_atomic
from brainuad.methods import build_method, method_class
from brainuad.methods.base import FINAL_STAGE
from brainuad.provenance import provenance, seed_everything
from brainuad.slices.hdf5 import ConcatSliceDataset, SliceDataset, SliceFile
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
        "channels": list(getattr(dataset, "channels", range(len(slices.sequences)))),
        "size": getattr(dataset, "size", None),
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


@dataclass(frozen=True)
class TrainingCohort:
    """One dataset a stage trains on: its slice file and splits file.

    ``healthy_training_cohort`` is True for the study's healthy cohort (fold-specific
    train/val), False for a lesion cohort (its train/val split, the same in every fold).
    """

    dataset: str
    slice_path: PathLike
    splits_path: PathLike
    healthy_training_cohort: bool


def _cohort_subjects(cohort: TrainingCohort, fold: int, split: str) -> list[str]:
    return subjects_in(read_splits(cohort.splits_path), fold=fold, split=split)


def steps_for_epochs(epochs: float, *, epoch_size: int, batch_size: int) -> int:
    """Optimiser steps of ``epochs`` epochs of ``epoch_size`` samples (at least one step).

    With the cDDPM reference's epoch (one slice per training volume, 387 IXI volumes) and
    batch 32, an epoch is 12.1 steps: DDPM's 1600 epochs are 19 350 steps.
    """
    return max(1, math.ceil(epochs * epoch_size / batch_size))


def train_fold(
    *,
    method_name: str,
    model_hparams: dict[str, Any],
    training: dict[str, Any],
    cohorts: Sequence[TrainingCohort],
    fold: int,
    checkpoint_dir: PathLike,
    out_model: PathLike,
    out_log: PathLike,
    out_config: PathLike,
    seed: int,
    stage: str = FINAL_STAGE,
    consumed: Mapping[str, PathLike] | None = None,
    inputs: Sequence[str] | None = None,
    size: int | None = None,
    variant: str | None = None,
    device: str = "auto",
    study_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``stage`` of method ``method_name`` on fold ``fold`` of ``cohorts``.

    Args:
        method_name: the registered implementation.
        model_hparams: its hyperparameters; ``in_channels`` defaults to the number of
            ``inputs`` (a different value is refused).
        training: ``TrainingRun`` settings of this stage; ``max_epochs`` may replace
            ``max_steps`` (an epoch is one slice per training volume with the ``volumes``
            sampler, every training slice otherwise).
        cohorts: the datasets trained on. A healthy-supervised stage takes exactly the
            healthy training cohort; an ``image_labels`` stage takes lesion cohorts (and
            optionally the healthy one).
        stage: the stage trained; ``consumed`` maps each stage it consumes to its file.
        inputs: sequences read (a method's ``inputs``), default all of the slice file's.
        size: the method's working size (slices resampled), default the slice size.
        variant: the study's name of this configured method (recorded).

    The checkpoint in ``checkpoint_dir`` is resumed only if it was made with the same
    settings and the same training slices (:func:`training_data_fingerprint`). Returns the
    loop's summary.
    """
    cls = method_class(method_name)
    cls.stage(stage)
    _check_cohorts(method_name, stage, cls.stage_supervision(stage), cohorts)
    first = SliceFile(cohorts[0].slice_path)
    sequences = list(inputs) if inputs else list(first.sequences)
    hparams = dict(model_hparams)
    if hparams.setdefault("in_channels", len(sequences)) != len(sequences):
        raise InputError(
            f"methods.{variant or method_name}.model.in_channels: {hparams['in_channels']}, "
            f"but the method reads {len(sequences)} sequence(s) {sequences}"
        )
    train_parts, val_parts, record_subjects = [], [], {}
    for cohort in cohorts:
        train_subjects = _cohort_subjects(cohort, fold, "train")
        val_subjects = _cohort_subjects(cohort, fold, "val")
        if not train_subjects:
            raise InputError(
                f"{cohort.splits_path}: fold {fold} has no train subject; for lesion cohorts "
                "set splits.lesion_train_fraction > 0"
            )
        train_parts.append(
            SliceDataset(cohort.slice_path, subjects=train_subjects, sequences=sequences, size=size)
        )
        if val_subjects:
            val_parts.append(
                SliceDataset(
                    cohort.slice_path, subjects=val_subjects, sequences=sequences, size=size
                )
            )
        record_subjects[cohort.dataset] = {"train": train_subjects, "val": val_subjects}
    names = [c.dataset for c in cohorts]
    train_dataset = (
        train_parts[0] if len(train_parts) == 1 else ConcatSliceDataset(train_parts, names)
    )
    val_dataset = None
    if val_parts:
        val_names = [c.dataset for c in cohorts if record_subjects[c.dataset]["val"]]
        val_dataset = (
            val_parts[0] if len(val_parts) == 1 else ConcatSliceDataset(val_parts, val_names)
        )

    settings = dict(training)
    max_epochs = settings.pop("max_epochs", None)
    if max_epochs is not None:
        batch_size = settings.get("batch_size") or cls.default_batch_size
        volumes = settings.get("sampler", "slices") == "volumes"
        epoch_size = len(set(train_dataset.subjects)) if volumes else len(train_dataset)
        settings["max_steps"] = steps_for_epochs(
            max_epochs, epoch_size=epoch_size, batch_size=batch_size
        )
    seed_everything(seed)
    method = build_method(method_name, **hparams)
    for earlier, path in (consumed or {}).items():
        method.load_stage(earlier, path)
    checkpoint_dir = Path(checkpoint_dir)
    run = TrainingRun(
        checkpoint_path=checkpoint_dir / "last.pt",
        log_path=checkpoint_dir / "train_log.csv",
        seed=seed,
        device=device,
        progress=progress,
        **settings,
    )
    summary = train(
        method,
        train_dataset,
        val_dataset,
        run,
        stage=stage,
        data_fingerprint=_fingerprint(train_parts),
    )
    method.to("cpu").save(out_model)
    with atomic_path(out_log) as tmp:
        shutil.copyfile(run.log_path, tmp)
    record = {
        "method": variant or method_name,
        "implementation": method_name,
        "stage": stage,
        "fold": fold,
        "hparams": method.hparams,
        "training": training,
        "max_epochs": max_epochs,
        "max_steps": run.max_steps,
        "inputs": sequences,
        "size": size or int(first.shape[-1]),
        "consumed": {k: str(v) for k, v in (consumed or {}).items()},
        "trained_on": {
            "supervision": cls.stage_supervision(stage),
            "datasets": {
                c.dataset: {
                    "slices": str(c.slice_path),
                    "splits": str(c.splits_path),
                    **record_subjects[c.dataset],
                }
                for c in cohorts
            },
        },
        "summary": summary,
        "provenance": provenance(study_config),
    }
    write_text_atomic(out_config, json.dumps(record, indent=2, default=str))
    return summary


def _check_cohorts(
    method_name: str, stage: str, supervision: str, cohorts: Sequence[TrainingCohort]
) -> None:
    """Healthy-supervised stages read the healthy training cohort and nothing else."""
    if not cohorts:
        raise InputError(f"method {method_name!r} stage {stage!r}: no training dataset given")
    if supervision == "healthy" and (len(cohorts) != 1 or not cohorts[0].healthy_training_cohort):
        raise InputError(
            f"method {method_name!r} stage {stage!r} is trained on healthy slices only, but "
            f"was given {[c.dataset for c in cohorts]}; expected only the healthy cohort"
        )


def _fingerprint(parts: Sequence[SliceDataset]) -> str:
    if len(parts) == 1:
        return training_data_fingerprint(parts[0])
    digest = hashlib.sha256()
    for part in parts:
        digest.update(training_data_fingerprint(part).encode())
    return digest.hexdigest()
