"""MSLUB: "3D MR image database of multiple sclerosis patients with white matter lesion
segmentations" (Lesjak et al. 2018, Neuroinformatics), University of Ljubljana.

Layout: one folder per patient (``patient01`` ... ``patient30``) with the original names
``T1W.nii.gz``, ``T2W.nii.gz``, ``FLAIR.nii.gz`` (``T1WKS.nii.gz``, post-contrast, unused)
and the consensus mask ``consensus_gt.nii.gz``; the common re-packaging with lower-case
``t1``/``t2``/``flair`` and ``seg`` (or ``<patient>_<name>``) names is accepted too. Raw
heads with skull: all preprocessing steps apply; use the co-registered release (or set
``coregister_sequences``) so the mask is on the reference sequence's grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from brainuad.data.adapters.base import (
    Adapter,
    Discovery,
    LabelConvention,
    SubjectRecord,
    check_unique,
    first_existing,
    require_folder,
    subject_id,
)
from brainuad.errors import InputError

PATIENT_PATTERN = re.compile(r"^patient\d+$")
NAMES = {
    "t1": ("T1W.nii.gz", "t1.nii.gz", "T1.nii.gz"),
    "t2": ("T2W.nii.gz", "t2.nii.gz", "T2.nii.gz"),
    "flair": ("FLAIR.nii.gz", "flair.nii.gz"),
    "seg": ("consensus_gt.nii.gz", "seg.nii.gz", "mask.nii.gz"),
}


def _candidates(patient: str, names: tuple[str, ...]) -> list[str]:
    return [*names, *(f"{patient}_{name}" for name in names)]


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of an MSLUB folder: every ``patient<nn>`` folder below ``root``."""
    root = require_folder(root, "mslub")
    records = []
    for folder in sorted(p for p in root.rglob("patient*") if p.is_dir()):
        if PATIENT_PATTERN.match(folder.name) is None:
            continue
        files = {}
        for name, options in NAMES.items():
            path = first_existing(folder, _candidates(folder.name, options))
            if path is not None:
                files[name] = path
            elif name == "seg" or name in sequences:
                raise InputError(f"{folder}: no {name} file; expected one of {list(options)}")
        records.append(
            SubjectRecord(subject=subject_id(folder.name), source_id=folder.name, files=files)
        )
    if not records:
        raise InputError(f"{root}: no patient<nn> folders found")
    return Discovery(records=check_unique(records, root))


ADAPTER = Adapter(
    name="mslub",
    sequences=("t1", "t2", "flair"),
    labels=LabelConvention(lesion=(1,), description="MSLUB: binary consensus lesion mask"),
    discover=discover,
)
