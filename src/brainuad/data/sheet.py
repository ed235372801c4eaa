"""The subject sheet of a dataset: ``results/subjects/<dataset>.tsv``.

One row per subject: ``subject`` (the workflow id), ``source_id`` (the id in the download),
``site``, one column per file (``t1``, ``t2``, ``flair``, ``pd``, ``t1ce``, ``seg``,
``brainmask_truth``; empty where the subject has no such file) and ``metadata`` (JSON).
Its schema is ``config/subjects.schema.yaml``; the workflow's input functions read the sheet,
so each dataset carries only the files it has. A download that ships its own splits
(``cddpm_release``) adds a ``release_split`` column (train/val/test per fold), which the
splits step uses (``splits.source``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from brainuad.data.adapters import get_adapter
from brainuad.data.adapters import synthetic as synthetic_adapter
from brainuad.data.adapters.base import FILE_COLUMNS, Discovery, LabelConvention, SubjectRecord
from brainuad.data.adapters.validate import validate_record
from brainuad.errors import InputError
from brainuad.io.atomic import write_text_atomic

SHEET_COLUMNS: tuple[str, ...] = ("subject", "source_id", "site", *FILE_COLUMNS, "metadata")
# Written only where the download has it (the sheets of other datasets stay as they were).
RELEASE_SPLIT = "release_split"


@dataclass
class Sheet:
    """A built sheet and the subjects left out of it, with the reason."""

    table: pd.DataFrame
    skipped: list[tuple[str, str]]


def _table(records: Sequence[SubjectRecord], infos: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for record, info in zip(records, infos, strict=True):
        row = {"subject": record.subject, "source_id": record.source_id, "site": record.site}
        row.update({c: str(record.files[c]) if c in record.files else "" for c in FILE_COLUMNS})
        row["metadata"] = json.dumps({**record.metadata, **info}, sort_keys=True)
        row[RELEASE_SPLIT] = record.release_split
        rows.append(row)
    columns = list(SHEET_COLUMNS)
    if any(record.release_split for record in records):
        columns.append(RELEASE_SPLIT)
    return pd.DataFrame(rows, columns=columns)


def build_sheet(
    *,
    source: str,
    sequences: Sequence[str],
    path: str | os.PathLike | None = None,
    n_subjects: int | None = None,
    lesion: str = "none",
    file_pattern: str | None = None,
    same_grid: bool = True,
    threads: int = 1,
    layout: dict[str, Any] | None = None,
) -> Sheet:
    """Discover a dataset's subjects and validate every file the study will read.

    Args:
        source: ``synthetic`` or an adapter name (``brainuad.data.adapters.ADAPTERS``).
        sequences: the sequences the study uses for this dataset, reference first.
        path: the dataset folder (real sources).
        n_subjects, lesion, file_pattern: the synthetic cohort (see
            :func:`brainuad.data.adapters.synthetic.discover`); its files are made later by
            the workflow, so they are not read here.
        same_grid: require every sequence on the reference's grid (False where
            preprocessing co-registers them).
        threads: files are read in this many threads (zlib releases the GIL).
        layout: the dataset's ``layout:`` options (adapters that take some: ``bids``).

    Raises:
        InputError: from the adapter (layout) or :func:`validate_record` (a file), naming
            the file and what was expected; or when no subject is left.
    """
    if source == "synthetic":
        if n_subjects is None or file_pattern is None:
            raise InputError("synthetic source: n_subjects and file_pattern are required")
        discovery = synthetic_adapter.discover(n_subjects, sequences, file_pattern, lesion)
        infos: list[dict[str, Any]] = [{} for _ in discovery.records]
    else:
        adapter = get_adapter(source)
        if path is None:
            raise InputError(f"source '{source}': the dataset folder (path) is required")
        discovery: Discovery = adapter.find(Path(path), sequences, layout)
        labels = adapter.labels_for(lesion, layout)
        if labels is None:  # a healthy dataset of a mixed layout: no lesion labels read
            discovery.records = [
                replace(r, files={k: v for k, v in r.files.items() if k != "seg"})
                for r in discovery.records
            ]
        elif adapter.mixed:  # a lesion dataset of a mixed layout: subjects without a mask
            discovery.skipped += [
                (r.source_id, "no lesion mask") for r in discovery.records if "seg" not in r.files
            ]
            discovery.records = [r for r in discovery.records if "seg" in r.files]

        def check(record: SubjectRecord) -> dict[str, Any]:
            return validate_record(record, sequences=sequences, labels=labels, same_grid=same_grid)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            infos = list(pool.map(check, discovery.records))
    if len(discovery.records) < 2:
        raise InputError(
            f"{path or source}: {len(discovery.records)} usable subject(s); expected at "
            f"least 2 (skipped: {discovery.skipped})"
        )
    return Sheet(table=_table(discovery.records, infos), skipped=discovery.skipped)


def write_sheet(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the sheet as TSV, atomically."""
    write_text_atomic(path, table.to_csv(sep="\t", index=False))


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """The sheet as strings, empty cells as ``""`` (not NaN), indexed by nothing."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable subject sheet ({err})") from err
    missing = [c for c in SHEET_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: subject sheet lacks column(s) {missing}")
    return table


def subject_files(table: pd.DataFrame, subject: str) -> dict[str, str]:
    """Column -> path of the files ``subject`` has (empty cells left out)."""
    rows = table[table["subject"] == subject]
    if len(rows) != 1:
        raise InputError(f"subject sheet: expected one row for '{subject}', found {len(rows)}")
    row = rows.iloc[0]
    return {c: row[c] for c in FILE_COLUMNS if row[c]}


def sheet_labels(labels: LabelConvention | None) -> dict[str, list[int]]:
    """The label convention as JSON-ready lists, for rule params."""
    if labels is None:
        return {"lesion": [], "ignore": []}
    return {"lesion": list(labels.lesion), "ignore": list(labels.ignore)}
