"""WMH Segmentation Challenge 2017 (Kuijf et al. 2019), training data.

Layout: ``<site>/<id>/pre/{FLAIR,T1}.nii.gz`` and ``<site>/<id>/wmh.nii.gz`` (sites
Utrecht, Singapore, and Amsterdam's GE3T / GE1T5 / Philips_VU, possibly one folder deeper).
The ``pre`` images are bias-corrected and the T1 is registered to the FLAIR, whose grid the
labels share. Label 1 is white-matter hyperintensity; label 2 is "other pathology", which is
neither lesion nor healthy: it is excluded from the lesion mask and from scoring (an ignore
mask carried to the metrics).
"""

from __future__ import annotations

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

FILES = {"flair": "pre/FLAIR.nii.gz", "t1": "pre/T1.nii.gz"}


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of a WMH 2017 folder: every folder holding ``wmh.nii.gz``."""
    root = require_folder(root, "wmh2017")
    records = []
    for labels in sorted(root.rglob("wmh.nii.gz")):
        folder = labels.parent
        site = folder.parent.name
        files = {"seg": labels}
        for sequence, name in FILES.items():
            if (folder / name).is_file():
                files[sequence] = folder / name
            elif sequence in sequences:
                raise InputError(f"{folder / name}: missing; expected the WMH 2017 {name}")
        records.append(
            SubjectRecord(
                subject=subject_id(f"{site}{folder.name}"),
                source_id=f"{site}/{folder.name}",
                files=files,
                site=site,
            )
        )
    if not records:
        raise InputError(f"{root}: no <site>/<id>/wmh.nii.gz subjects found")
    return Discovery(records=check_unique(records, root))


ADAPTER = Adapter(
    name="wmh2017",
    sequences=("t1", "flair"),
    labels=LabelConvention(
        lesion=(1,), ignore=(2,), description="WMH 2017: 1 WMH, 2 other pathology (ignored)"
    ),
    discover=discover,
)
