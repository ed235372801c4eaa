"""BraTS 2021 (RSNA-ASNR-MICCAI BraTS challenge, Baid et al. 2021) training data.

Layout: ``BraTS2021_<nnnnn>/BraTS2021_<nnnnn>_{t1,t1ce,t2,flair,seg}.nii.gz``, 240 x 240 x
155 at 1 mm, skull-stripped and co-registered to the SRI24 atlas. Labels: 1 necrotic core,
2 oedema, 4 enhancing tumour; the lesion is any non-zero label, and the sub-labels are kept
in the slice file for per-region metrics.
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

FOLDER_PATTERN = re.compile(r"^BraTS2021_(?P<number>\d{5})$")
SEQUENCES = ("t1", "t1ce", "t2", "flair")


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of a BraTS 2021 folder: every ``BraTS2021_<nnnnn>`` folder below ``root``."""
    root = require_folder(root, "brats2021")
    records = []
    for folder in sorted(p for p in root.rglob("BraTS2021_*") if p.is_dir()):
        match = FOLDER_PATTERN.match(folder.name)
        if match is None:
            continue
        files = {}
        for name in (*SEQUENCES, "seg"):
            path = folder / f"{folder.name}_{name}.nii.gz"
            if path.is_file():
                files[name] = path
            elif name == "seg" or name in sequences:
                raise InputError(f"{path}: missing; expected the BraTS 2021 {name} file")
        records.append(
            SubjectRecord(
                subject=subject_id(f"BraTS{match['number']}"),
                source_id=folder.name,
                files=files,
            )
        )
    if not records:
        raise InputError(f"{root}: no BraTS2021_<nnnnn> subject folders found")
    return Discovery(records=check_unique(records, root))


ADAPTER = Adapter(
    name="brats2021",
    sequences=SEQUENCES,
    labels=LabelConvention(
        lesion=(1, 2, 4), description="BraTS 2021: 1 necrosis, 2 oedema, 4 enhancing"
    ),
    discover=discover,
    preprocess_defaults={"skullstrip_method": "none"},
)
