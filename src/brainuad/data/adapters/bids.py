"""Any BIDS dataset (bids.neuroimaging.io), for users' own data: healthy, or with lesion
masks in a derivatives pipeline.

Layout (BIDS 1.x): ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_...]_<suffix>``
with suffix ``T1w``, ``T2w`` or ``FLAIR`` and extension ``.nii.gz`` or ``.nii``; lesion masks
under ``derivatives/<pipeline>/sub-<label>/[ses-<label>/]...``, found by file name:
``*label-lesion*.nii*`` or ``*lesion*_mask.nii*`` by default (e.g.
``sub-01_ses-1_space-orig_label-lesion_mask.nii.gz``, or ATLAS's
``..._label-L_desc-T1lesion_mask.nii.gz``). The dataset's ``layout:`` block may set
``derivatives`` (the pipeline folder), ``mask`` (another file-name glob), ``session`` (one
session; default each subject's first) and ``lesion_labels`` / ``ignore_labels`` (default:
binary masks, lesion = 1).

Where a subject has several files of one suffix (runs, acquisitions), the one with the
shortest name (fewest entities) is read and the others are listed in the sheet's metadata.
A subject missing a used sequence is skipped and listed; in a lesion dataset, so is a
subject without a mask (the controls of a patient study); two masks matching for one
subject is an error naming them. Heads are raw and the sequences are on their own grids, so
every preprocessing step applies and the sequences are co-registered
(``coregister_sequences: true``); the mask must be on the reference sequence's grid (set
``reference_sequence`` to the sequence it was drawn on).
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

SUFFIXES = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR"}
DEFAULT_MASKS = ("*label-lesion*.nii*", "*lesion*_mask.nii*")
_SESSION = re.compile(r"_ses-([A-Za-z0-9]+)_")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


def _anat(subject: Path, session: str | None) -> tuple[Path, str | None] | None:
    """The subject's ``anat`` folder and session label (None where there are no
    sessions); None when the asked-for session is absent."""
    sessions = sorted(p for p in subject.glob("ses-*") if (p / "anat").is_dir())
    if session is not None:
        wanted = subject / (session if session.startswith("ses-") else f"ses-{session}")
        return (wanted / "anat", wanted.name) if (wanted / "anat").is_dir() else None
    if sessions:
        return sessions[0] / "anat", sessions[0].name
    return (subject / "anat", None) if (subject / "anat").is_dir() else None


def _image(anat: Path, subject: str, suffix: str) -> tuple[Path | None, list[str]]:
    candidates = sorted(
        (p for p in anat.glob(f"{subject}_*{suffix}.nii*") if _NIFTI.search(p.name)),
        key=lambda p: (len(p.name), p.name),
    )
    candidates = [p for p in candidates if _NIFTI.sub("", p.name).endswith(f"_{suffix}")]
    if not candidates:
        return None, []
    return candidates[0], [p.name for p in candidates[1:]]


def _mask(
    root: Path, subject: str, session: str | None, derivatives: str | None, patterns
) -> Path | None:
    base = root / "derivatives"
    pipelines = (
        [base / derivatives]
        if derivatives
        else sorted(p for p in base.glob("*") if p.is_dir())
        if base.is_dir()
        else []
    )
    if derivatives and not pipelines[0].is_dir():
        raise InputError(f"{pipelines[0]}: missing; layout.derivatives names this folder")
    found = set()
    for pipeline in pipelines:
        folder = pipeline / subject
        for pattern in patterns:
            for path in folder.rglob(pattern):
                other = _SESSION.search(path.name)
                if session and other and f"ses-{other[1]}" != session:
                    continue  # another session's mask
                found.add(path)
    if len(found) > 1:
        raise InputError(
            f"{subject}: {len(found)} lesion masks match {list(patterns)}: "
            f"{sorted(str(p) for p in found)}; expected one: set layout.derivatives or "
            "layout.mask"
        )
    return found.pop() if found else None


def discover(
    root: Path,
    sequences: Sequence[str],
    *,
    derivatives: str | None = None,
    mask: str | None = None,
    session: str | None = None,
) -> Discovery:
    """Subjects of a BIDS dataset: every ``sub-*`` folder at its top level."""
    root = require_folder(root, "bids")
    patterns = (mask,) if mask else DEFAULT_MASKS
    discovery = Discovery()
    records = []
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise InputError(f"{root}: no sub-<label> folders; expected a BIDS dataset")
    for folder in subjects:
        located = _anat(folder, session)
        if located is None:
            reason = f"no {session} session" if session else "no anat folder"
            discovery.skipped.append((folder.name, reason))
            continue
        anat, ses = located
        files, others = {}, {}
        for sequence, suffix in SUFFIXES.items():
            path, alternatives = _image(anat, folder.name, suffix)
            if path is not None:
                files[sequence] = path
            if alternatives:
                others[sequence] = alternatives
        lacking = [s for s in sequences if s not in files]
        if lacking:
            discovery.skipped.append(
                (folder.name, f"no {', '.join(SUFFIXES[s] for s in lacking)} image in {anat}")
            )
            continue
        lesion = _mask(root, folder.name, ses, derivatives, patterns)
        if lesion is not None:
            files["seg"] = lesion
        metadata = {"session": ses} if ses else {}
        if others:
            metadata["not_read"] = others
        records.append(
            SubjectRecord(
                subject=subject_id(folder.name),
                source_id=folder.name if ses is None else f"{folder.name}/{ses}",
                files=files,
                metadata=metadata,
            )
        )
    discovery.records = check_unique(records, root)
    return discovery


ADAPTER = Adapter(
    name="bids",
    sequences=tuple(SUFFIXES),
    labels=LabelConvention(
        lesion=(1,), description="bids: binary lesion mask (layout.lesion_labels to change)"
    ),
    discover=discover,
    preprocess_defaults={"coregister_sequences": True},
    skip_incomplete=True,
    mixed=True,
    options=("derivatives", "mask", "session", "lesion_labels", "ignore_labels"),
)
