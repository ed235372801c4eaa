"""ATLAS R2.0 (Anatomical Tracings of Lesions After Stroke, Liew et al. 2022), training set.

Layout (BIDS-like, any depth below the folder, e.g. ``ATLAS_2/Training/R001/``):
``sub-r<sss>s<nnn>/ses-<k>/anat/sub-..._ses-..._space-MNI152NLin2009aSym_T1w.nii.gz`` and
``..._label-L_desc-T1lesion_mask.nii.gz``. T1 only, defaced, already in MNI space (so no
registration when the template is MNI152); the lesion mask is binary (0/1).
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
    require_folder,
    subject_id,
)
from brainuad.errors import InputError

SUBJECT_PATTERN = re.compile(r"^sub-r(?P<site>\d{3})s\d{3}$")


def _one(anat: Path, suffix: str) -> Path:
    matches = sorted(anat.glob(f"*{suffix}"))
    if len(matches) != 1:
        raise InputError(f"{anat}: expected exactly one '*{suffix}' file, found {len(matches)}")
    return matches[0]


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of an ATLAS R2.0 folder (first session of each ``sub-r<sss>s<nnn>``)."""
    root = require_folder(root, "atlas2")
    records = []
    for folder in sorted(p for p in root.rglob("sub-r*") if p.is_dir()):
        match = SUBJECT_PATTERN.match(folder.name)
        if match is None:
            continue
        sessions = sorted(folder.glob("ses-*/anat"))
        if not sessions:
            raise InputError(f"{folder}: no ses-*/anat folder; expected the ATLAS R2.0 layout")
        anat = sessions[0]
        records.append(
            SubjectRecord(
                subject=subject_id(folder.name),
                source_id=folder.name,
                files={
                    "t1": _one(anat, "_T1w.nii.gz"),
                    "seg": _one(anat, "_label-L_desc-T1lesion_mask.nii.gz"),
                },
                site=f"R{match['site']}",
            )
        )
    if not records:
        raise InputError(f"{root}: no sub-r<sss>s<nnn> subject folders found")
    return Discovery(records=check_unique(records, root))


ADAPTER = Adapter(
    name="atlas2",
    sequences=("t1",),
    labels=LabelConvention(lesion=(1,), description="ATLAS R2.0: binary lesion mask"),
    discover=discover,
    preprocess_defaults={"sequences": ["t1"], "reference_sequence": "t1", "register": False},
)
