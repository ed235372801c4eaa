"""IXI (brain-development.org/ixi-dataset): healthy adults from three London hospitals.

Layout: flat folders (one per downloaded tarball, or all files in one) of
``IXI<nnn>-<site>-<nnnn>-{T1,T2,PD}.nii.gz``, site ``Guys``, ``HH`` or ``IOP``. Raw heads,
not registered, and T1 (sagittal) and T2/PD (axial) on different grids, so the sequences
are co-registered to the reference in preprocessing. No segmentation. A subject missing a
sequence the study uses is skipped and listed in the sheet's log (a few IXI subjects lack
T2 or PD), not fatal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from brainuad.data.adapters.base import (
    Adapter,
    Discovery,
    SubjectRecord,
    check_unique,
    require_folder,
    subject_id,
)

FILE_PATTERN = re.compile(
    r"^IXI(?P<number>\d{3})-(?P<site>Guys|HH|IOP)-\d{4}-(?P<seq>T1|T2|PD)\.nii\.gz$"
)
SEQUENCE_NAMES = {"T1": "t1", "T2": "t2", "PD": "pd"}


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of an IXI folder (searched recursively for the IXI file names)."""
    root = require_folder(root, "ixi")
    found: dict[str, dict] = {}
    for path in sorted(root.rglob("IXI*.nii.gz")):
        match = FILE_PATTERN.match(path.name)
        if match is None:
            continue  # MRA, DTI and other IXI files the study does not use
        source_id = f"IXI{match['number']}"
        entry = found.setdefault(source_id, {"site": match["site"], "files": {}})
        entry["files"][SEQUENCE_NAMES[match["seq"]]] = path
    discovery = Discovery()
    records = []
    for source_id, entry in sorted(found.items()):
        missing = [s for s in sequences if s not in entry["files"]]
        if missing:
            discovery.skipped.append((source_id, f"no {', '.join(missing)} image"))
            continue
        records.append(
            SubjectRecord(
                subject=subject_id(source_id),
                source_id=source_id,
                files=entry["files"],
                site=entry["site"],
            )
        )
    discovery.records = check_unique(records, root)
    return discovery


ADAPTER = Adapter(
    name="ixi",
    sequences=("t1", "t2", "pd"),
    labels=None,
    discover=discover,
    preprocess_defaults={"coregister_sequences": True},
    skip_incomplete=True,
)
