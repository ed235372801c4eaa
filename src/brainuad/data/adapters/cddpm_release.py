"""The cDDPM authors' preprocessed download (Behrendt et al. 2023, arXiv 2312.04215;
README of FinnBehrendt/Conditioned-Diffusion-Models-UAD, "Data").

Layout of the release folder (``<DATA_DIR>`` in that README)::

    Train/ixi/{t1,t2,mask}/            healthy IXI volumes and brain masks
    Test/<set>/{t1|t2,mask,seg}/       Brats21, MSLUB, ATLAS_v2, WMH, ...
    splits/*.csv                       IXI_train_fold<k>, IXI_val_fold<k>, IXI_test,
                                       Brats21_val, Brats21_test, MSLUB_val, ...

A dataset of the study is one set folder: ``path`` is ``<release>/Train/ixi`` or
``<release>/Test/<set>``, and the release's ``splits/`` is read two levels up.

Split files (pandas CSVs written with their index; ``Datamodules_*.py`` of the reference
read the columns ``img_name``, ``img_path``, ``mask_path``, ``seg_path``, ``age``,
``label``): ``img_path`` is relative to the release folder (``/Train/ixi/t1/<name>...``;
the reference prefixes ``<pathBase>/Data/``) and always names the T1 file, which the
reference rewrites to the sequence it trains on; so a row is matched to this set by the
``Train|Test/<set>`` part of ``img_path`` and to its files by the subject's name, the file
name without ``.nii.gz`` and without a trailing ``_t1`` / ``_t2`` / ``_flair`` / ``_mask`` /
``_seg``. The role of a file comes from its name: ``*_train_fold<k>`` and
``*_val_fold<k>`` give fold ``k``, ``*_test`` and ``*_val`` (no fold) hold for every fold.
CSVs without an ``img_path`` column (the reference's list of IXI subjects with a T2) and
rows of other sets are ignored. Each subject's assignment goes to the sheet's
``release_split`` column, which the splits step keeps (``splits.source``): the study's folds
are the paper's.

The volumes are the reference's output: 1 mm, skull-stripped (HD-BET; BraTS stripped
already), affinely registered to the SRI24 T1 brain, cropped to the brain box and
N4-corrected; so the adapter's defaults skip registration, stripping and N4
(``register: false``, ``skullstrip_method: none``, ``n4: false``): the volumes are only
resampled onto the study's output grid, whose template should then be SRI24
(``preprocess.template``). The ``mask/`` files are the release's brain masks, carried as
``brainmask_truth`` (validated, and compared in QC with the non-zero voxels that preprocessing
takes as the brain). Lesion labels are binary (the reference resamples labels linearly and
keeps > 0). A subject of a set without ``seg/`` (Train/ixi) missing a used sequence is skipped
and listed, as the reference drops IXI subjects without T2; in a lesion set it is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from brainuad.data.adapters.base import (
    Adapter,
    Discovery,
    LabelConvention,
    SubjectRecord,
    check_unique,
    subject_id,
)
from brainuad.errors import InputError

SEQUENCES = ("t1", "t2", "flair")
KINDS = {**{s: s for s in SEQUENCES}, "mask": "brainmask_truth", "seg": "seg"}
SPLIT_FILE = re.compile(r"^(?P<prefix>.+?)_(?P<split>train|val|test)(?:_fold(?P<fold>\d+))?$")
_SUFFIX = re.compile(r"[_-](t1|t2|flair|mask|seg)$", re.IGNORECASE)
_IXI = re.compile(r"^IXI\d{3}-(?P<site>Guys|HH|IOP)-")


def subject_key(file_name: str) -> str:
    """``IXI002-Guys-0828_t1.nii.gz`` -> ``IXI002-Guys-0828``: the name shared by a
    subject's files across the set's folders."""
    stem = re.sub(r"\.nii(\.gz)?$", "", file_name)
    return _SUFFIX.sub("", stem)


def _set_folders(path: Path) -> tuple[Path, str]:
    """The release folder and the set's ``Train|Test/<set>`` key, refusing other paths."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: dataset folder of source 'cddpm_release' does not exist")
    if path.parent.name not in ("Train", "Test"):
        raise InputError(
            f"{path}: expected a set folder of the cDDPM release, <release>/Train/ixi or "
            "<release>/Test/<set> (e.g. Test/Brats21)"
        )
    return path.parent.parent, f"{path.parent.name}/{path.name}"


def _files(folder: Path) -> dict[str, dict[str, Path]]:
    """kind (t1, t2, flair, mask, seg) -> subject key -> file, from the set's subfolders."""
    found: dict[str, dict[str, Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        kind = sub.name.lower()
        if kind not in KINDS:
            continue
        files: dict[str, Path] = {}
        for file in sorted(sub.glob("*.nii*")):
            key = subject_key(file.name)
            if key in files:
                raise InputError(
                    f"{sub}: {files[key].name} and {file.name} are both subject '{key}'"
                )
            files[key] = file
        found[kind] = files
    return found


def _row_set(img_path: str, csv: Path) -> tuple[str, str]:
    """(``Train|Test/<set>``, subject key) of a split row."""
    parts = PurePosixPath(str(img_path).replace("\\", "/")).parts
    for i, part in enumerate(parts[:-2]):
        if part in ("Train", "Test"):
            return f"{part}/{parts[i + 1]}", subject_key(parts[-1])
    raise InputError(
        f"{csv}: img_path '{img_path}' is not under Train/ or Test/; expected the "
        "release's relative paths (/Train/ixi/t1/...)"
    )


def read_release_splits(root: Path, set_key: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Each subject key of the set -> its ``release_split`` value, and its metadata.

    Raises:
        InputError: naming the CSV: no ``splits/`` folder or no split file for the set, an
            unreadable CSV, a subject in two splits of one fold, folds not numbered
            0..k-1, or a subject missing from one fold.
    """
    folder = root / "splits"
    if not folder.is_dir():
        raise InputError(f"{folder}: missing; expected the release's split CSVs there")
    per_fold: dict[str, dict[int, tuple[str, Path]]] = {}
    common: dict[str, tuple[str, Path]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    folds: set[int] = set()
    for csv in sorted(folder.glob("*.csv")):
        try:
            table = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise InputError(f"{csv}: not a readable split CSV ({err})") from err
        match = SPLIT_FILE.match(csv.stem)
        if "img_path" not in table.columns or match is None:
            continue  # e.g. the list of IXI subjects with a T2 image
        split, fold = match["split"], match["fold"]
        if fold is None and split == "train":
            raise InputError(f"{csv}: a train split without _fold<k> in its name")
        for _, row in table.iterrows():
            row_set, key = _row_set(row["img_path"], csv)
            if row_set != set_key:
                continue
            age = row.get("age")
            if age is not None and pd.notna(age):
                metadata.setdefault(key, {})["age"] = float(age)
            if fold is None:
                earlier = common.get(key)
                if earlier and earlier[0] != split:
                    raise InputError(
                        f"{csv}: subject '{key}' is also in {earlier[1].name} "
                        f"({earlier[0]}); expected one split per subject"
                    )
                common[key] = (split, csv)
                continue
            k = int(fold)
            folds.add(k)
            earlier = per_fold.setdefault(key, {}).get(k)
            if earlier and earlier[0] != split:
                raise InputError(
                    f"{csv}: subject '{key}' is also in {earlier[1].name} ({earlier[0]}) "
                    f"of fold {k}; expected one split per subject and fold"
                )
            per_fold[key][k] = (split, csv)
    if not common and not per_fold:
        raise InputError(
            f"{folder}: no split CSV lists subjects of {set_key}; expected files such as "
            "IXI_train_fold0.csv or Brats21_test.csv with an img_path column"
        )
    if folds and sorted(folds) != list(range(len(folds))):
        raise InputError(
            f"{folder}: folds {sorted(folds)} of {set_key}; expected _fold0 ... "
            f"_fold{len(folds) - 1}"
        )
    assignments: dict[str, str] = {}
    for key in sorted(set(common) | set(per_fold)):
        if key in common and key in per_fold:
            other = next(iter(per_fold[key].values()))
            raise InputError(
                f"{common[key][1]}: subject '{key}' is {common[key][0]} in every fold and "
                f"{other[0]} in {other[1].name}; expected one split per subject and fold"
            )
        if key in common:
            assignments[key] = common[key][0]
            continue
        missing = [k for k in range(len(folds)) if k not in per_fold[key]]
        if missing:
            raise InputError(
                f"{folder}: subject '{key}' of {set_key} is in no split CSV of fold(s) "
                f"{missing}; expected it in train or val of every fold"
            )
        assignments[key] = ",".join(per_fold[key][k][0] for k in range(len(folds)))
    return assignments, metadata


def discover(root: Path, sequences: Sequence[str]) -> Discovery:
    """Subjects of one set of the release, with the release's split of each."""
    folder = Path(root)
    release, set_key = _set_folders(folder)
    files = _files(folder)
    available = [s for s in SEQUENCES if s in files]
    missing_folders = [s for s in sequences if s not in files]
    if missing_folders:
        raise InputError(
            f"{folder}: no {', '.join(f'{s}/' for s in missing_folders)} folder; this set "
            f"has {available}: set the dataset's preprocess.sequences to those"
        )
    lesion_set = "seg" in files
    assignments, metadata = read_release_splits(release, set_key)
    discovery = Discovery()
    records = []
    for key, split in assignments.items():
        lacking = [s for s in sequences if key not in files[s]]
        if lacking and not lesion_set:
            discovery.skipped.append((key, f"no {', '.join(lacking)} image"))
            continue
        for kind in [*lacking, *(["seg"] if lesion_set else [])]:
            if key not in files[kind]:
                raise InputError(
                    f"{folder / kind}: no file of subject '{key}' (listed in the release's "
                    f"splits); expected {key}_{kind}.nii.gz"
                )
        site = _IXI.match(key)
        records.append(
            SubjectRecord(
                subject=subject_id(key),
                source_id=f"{set_key}/{key}",
                files={KINDS[k]: files[k][key] for k in files if key in files[k]},
                site=site["site"] if site else "",
                metadata={"release_set": set_key, **metadata.get(key, {})},
                release_split=split,
            )
        )
    listed = set(assignments)
    for key in sorted({k for kind in files.values() for k in kind} - listed):
        discovery.skipped.append((key, "not in the release's split CSVs"))
    if not records:
        raise InputError(f"{folder}: no subject of the release's splits has its files here")
    discovery.records = check_unique(records, folder)
    return discovery


ADAPTER = Adapter(
    name="cddpm_release",
    sequences=SEQUENCES,
    labels=LabelConvention(
        lesion=(1,), description="cDDPM release: binary lesion mask (labels > 0 kept)"
    ),
    discover=discover,
    preprocess_defaults={"register": False, "skullstrip_method": "none", "n4": False},
    skip_incomplete=True,
    mixed=True,
)
