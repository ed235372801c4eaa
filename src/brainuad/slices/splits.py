"""Subject-level splits of a dataset: the ``subject, split, fold`` table.

One row per (subject, fold); folds are 0-based and ``table[table.fold == k]`` is the complete
assignment of fold ``k``. Healthy cohorts get a held-out test set shared by all folds and k-fold
train/val over the rest; lesion cohorts get one train/val/test split repeated for every fold:
the ``train`` part (``splits.lesion_train_fraction``, default 0) is read only by weakly
supervised methods (slice labels), ``val`` only for calibration and image-label validation,
and ``test`` is shared by every method. Assignments depend only on the set of subject ids
and the seed, never on the order the ids are given in. A download that ships its own folds
(``cddpm_release``) keeps them (:func:`release_splits`, ``splits.source``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from brainuad.errors import InputError
from brainuad.io.atomic import write_text_atomic
from brainuad.io.readers import corrupt_file_error, require_file

COLUMNS = ["subject", "split", "fold"]
SPLITS = ("train", "val", "test")


def _unique_subjects(subjects: Iterable[str], what: str) -> list[str]:
    """Sorted subject ids, refusing duplicates and empty ids."""
    ids = [str(s) for s in subjects]
    if len(set(ids)) != len(ids):
        duplicates = sorted({s for s in ids if ids.count(s) > 1})
        raise InputError(f"{what}: duplicate subject ids {duplicates[:5]}")
    if any(not s for s in ids):
        raise InputError(f"{what}: empty subject id")
    return sorted(ids)


def _check_n_folds(n_folds: int) -> int:
    if int(n_folds) != n_folds or n_folds < 2:
        raise InputError(f"splits.n_folds: expected an integer >= 2, got {n_folds!r}")
    return int(n_folds)


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _table(assignments: list[dict[str, str]]) -> pd.DataFrame:
    """Rows from one {subject: split} dict per fold, sorted by fold then subject."""
    rows = [
        (subject, split, fold)
        for fold, assignment in enumerate(assignments)
        for subject, split in sorted(assignment.items())
    ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["fold"] = table["fold"].astype(np.int64)
    return table


def _check_count(value: int | None, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise InputError(f"{key}: expected a non-negative integer, got {value!r}")
    return int(value)


def healthy_splits(
    subjects: Iterable[str],
    *,
    n_folds: int,
    test_fraction: float,
    seed: int,
    sizes: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Held-out healthy test set plus ``n_folds`` train/val folds over the other subjects.

    The subjects are sorted, shuffled with ``seed``; the first ``round(test_fraction * n)``
    (at least one when ``test_fraction > 0``) form the test set of every fold, and the rest
    are cut into ``n_folds`` near-equal parts: fold ``k`` validates on part ``k`` and trains
    on the others, so every training-cohort subject is in val exactly once across folds.

    With ``sizes`` (``splits.healthy_sizes``: counts, as the cDDPM paper's IXI 358 / 44 / 158)
    the test set is the first ``sizes["test"]`` shuffled subjects (instead of the fraction).
    With ``sizes["train"]`` the training cohort is the next ``train + val`` subjects (the
    surplus is in no split of any fold: left out of the study); with ``sizes["val"]`` fold
    ``k`` validates on the ``k``-th block of ``val`` subjects of the cohort (the blocks are
    disjoint, so no subject is in val twice) and trains on the rest of the cohort.

    Raises:
        InputError: ``n_folds < 2``, ``test_fraction`` outside ``[0, 1)``, duplicate ids,
            fewer than ``n_folds`` subjects left for training after the test set, or
            ``sizes`` asking for more subjects than there are (naming the key).
    """
    n_folds = _check_n_folds(n_folds)
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(
            f"splits.healthy_test_fraction: expected a value in [0, 1), got {test_fraction}"
        )
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise InputError(f"splits.healthy_sizes: keys {unknown}, expected some of {list(SPLITS)}")
    counts = {k: _check_count(v, f"splits.healthy_sizes.{k}") for k, v in sizes.items()}
    ids = _unique_subjects(subjects, "healthy subjects")
    if counts.get("test") is not None:
        n_test = counts["test"]
    else:
        n_test = _round_half_up(test_fraction * len(ids))
        if test_fraction > 0:
            n_test = max(n_test, 1)
    n_val, n_train = counts.get("val"), counts.get("train")
    if n_val == 0 or n_train == 0:
        raise InputError(f"splits.healthy_sizes: {sizes}: train and val need one subject each")
    if n_train is not None and n_val is None:
        raise InputError(f"splits.healthy_sizes: {sizes}: a train count needs a val count")
    if n_val is not None:
        cohort = len(ids) - n_test if n_train is None else n_train + n_val
        if n_test + cohort > len(ids) or n_folds * n_val > cohort:
            raise InputError(
                f"splits.healthy_sizes: {sizes} with n_folds={n_folds} cannot be met by "
                f"{len(ids)} healthy subjects: test takes {n_test}, the training cohort "
                f"{cohort} must fit in the {len(ids) - n_test} left and hold n_folds x val = "
                f"{n_folds * n_val} disjoint val subjects"
            )
    if len(ids) - n_test < n_folds:
        raise InputError(
            f"healthy subjects: {len(ids)} given, {n_test} go to the test set "
            f"(test_fraction={test_fraction}, sizes={sizes}), leaving {len(ids) - n_test} "
            f"for training; n_folds={n_folds} needs at least {n_folds} (one val subject per "
            f"fold), i.e. at least {n_test + n_folds} subjects"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    test, rest = shuffled[:n_test], shuffled[n_test:]
    if n_val is None:
        parts = [list(p) for p in np.array_split(np.array(rest, dtype=object), n_folds)]
    else:
        if n_train is not None:
            rest = rest[: n_train + n_val]
        parts = [rest[k * n_val : (k + 1) * n_val] for k in range(n_folds)]
        parts.append(rest[n_folds * n_val :])  # in train in every fold
    assignments = []
    for k in range(n_folds):
        assignment = dict.fromkeys(test, "test")
        for j, part in enumerate(parts):
            assignment.update(dict.fromkeys(part, "val" if j == k else "train"))
        assignments.append(assignment)
    return _table(assignments)


def lesion_splits(
    subjects: Iterable[str],
    *,
    n_folds: int,
    val_fraction: float,
    seed: int,
    train_fraction: float = 0.0,
    val_subjects: int | None = None,
) -> pd.DataFrame:
    """One train/val/test split of a lesion cohort, repeated for each of the ``n_folds`` folds.

    The subjects are sorted and shuffled with ``seed``; the first ``round(train_fraction * n)``
    go to train (at least one when ``train_fraction > 0``), the next
    ``round(val_fraction * n)`` to val and the rest to test. With two or more subjects left
    after train, val and test get at least one each; a single one goes to test. With
    ``train_fraction = 0`` the val/test assignment is the one of earlier versions.
    ``val_subjects`` (``splits.lesion_val_subjects``: a count, as the cDDPM paper's BraTS21
    100, MSLUB 10, ATLAS 175, WMH 15) replaces ``round(val_fraction * n)``: exactly that many
    go to val, and at least one subject must be left for test.

    Raises:
        InputError: ``n_folds < 2``, ``val_fraction`` outside ``(0, 1)``, ``train_fraction``
            outside ``[0, 1)``, no subjects, duplicate ids, or too few subjects to give
            train, val and test one each, or ``val_subjects`` leaving none for test.
    """
    n_folds = _check_n_folds(n_folds)
    val_subjects = _check_count(val_subjects, "splits.lesion_val_subjects")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(
            f"splits.lesion_val_fraction: expected a value in (0, 1), got {val_fraction}"
        )
    if not 0.0 <= train_fraction < 1.0:
        raise InputError(
            f"splits.lesion_train_fraction: expected a value in [0, 1), got {train_fraction}"
        )
    ids = _unique_subjects(subjects, "lesion subjects")
    if not ids:
        raise InputError("lesion subjects: none given, expected at least one")
    n_train = max(_round_half_up(train_fraction * len(ids)), 1) if train_fraction > 0 else 0
    if n_train and len(ids) - n_train < 2:
        raise InputError(
            f"lesion subjects: {len(ids)} given; splits.lesion_train_fraction={train_fraction} "
            f"puts {n_train} in train, leaving fewer than 2 for val and test"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    train, rest = shuffled[:n_train], shuffled[n_train:]
    if val_subjects is not None:
        if not 0 < val_subjects < len(rest):
            raise InputError(
                f"splits.lesion_val_subjects: {val_subjects} val subjects asked, but the "
                f"cohort has {len(ids)} ({n_train} in train): at most {len(rest) - 1} fit, "
                "leaving one for test (and at least 1 is needed)"
            )
        n_val = val_subjects
    else:
        n_val = _round_half_up(val_fraction * len(ids))
        n_val = min(max(n_val, 1), len(rest) - 1) if len(rest) >= 2 else 0
    assignment = dict.fromkeys(rest[n_val:], "test")
    assignment.update(dict.fromkeys(rest[:n_val], "val"))
    assignment.update(dict.fromkeys(train, "train"))
    return _table([assignment] * n_folds)


def release_splits(assignments: Mapping[str, str], *, n_folds: int, where: str) -> pd.DataFrame:
    """The splits table of a download that ships its own folds (``cddpm_release``).

    Args:
        assignments: subject -> its ``release_split`` sheet cell: one of train/val/test
            per fold, comma-separated (``"train,val,train"``), or a single value for every
            fold (a lesion cohort's ``"test"``).
        n_folds: ``splits.n_folds``; the release's first ``n_folds`` folds are used.
        where: the sheet, for messages.

    Raises:
        InputError: ``n_folds < 2``, an unknown split value, or a release with fewer folds
            than ``n_folds``.
    """
    n_folds = _check_n_folds(n_folds)
    ids = _unique_subjects(assignments, where)
    folds: list[dict[str, str]] = [{} for _ in range(n_folds)]
    for subject in ids:
        values = [v.strip() for v in str(assignments[subject]).split(",")]
        unknown = sorted(set(values) - set(SPLITS))
        if unknown:
            raise InputError(
                f"{where}: subject {subject}: release split {unknown}, expected one of "
                f"{list(SPLITS)} per fold"
            )
        if len(values) == 1:
            values = values * n_folds
        if len(values) < n_folds:
            raise InputError(
                f"{where}: subject {subject}: the release has {len(values)} folds, "
                f"splits.n_folds is {n_folds}; set n_folds to at most {len(values)}"
            )
        for k in range(n_folds):
            folds[k][subject] = values[k]
    return _table(folds)


def dataset_splits(
    subjects: Iterable[str],
    *,
    release: Mapping[str, str] | None,
    healthy: bool,
    options: Mapping[str, object],
    seed: int,
    where: str,
    dataset: str | None = None,
) -> pd.DataFrame:
    """The splits of one dataset as the study's ``splits`` block asks.

    Args:
        subjects: the dataset's subjects (its sheet).
        release: subject -> the sheet's ``release_split`` where the download ships its
            folds (cddpm_release), else None.
        healthy: the study's healthy training cohort (k-fold train/val + test).
        options: the ``splits`` block; ``source`` is ``auto`` (default: the release's
            folds where there are some, else drawn), ``draw`` or ``release`` (required).
            Counts, where given, replace fractions: ``healthy_sizes`` ({train, val, test})
            for the healthy cohort, ``lesion_val_subjects`` ({dataset: n}) for a lesion one.
        seed: the study seed, for drawn splits.
        where: the sheet, for messages.
        dataset: the dataset's name in the study, the key of ``lesion_val_subjects``.

    Raises:
        InputError: ``source: release`` for a dataset without release folds, or any error of
            the split functions.
    """
    source = options.get("source", "auto")
    subjects = list(subjects)
    if release is not None and any(not release.get(s) for s in subjects):
        release = None  # a sheet with release splits for only some subjects is not one
    if source == "release" and release is None:
        raise InputError(
            f"{where}: splits.source is 'release' but this dataset's download ships no "
            "folds (only cddpm_release does); use splits.source: auto"
        )
    if release is not None and source != "draw":
        return release_splits(
            {s: release[s] for s in subjects}, n_folds=options["n_folds"], where=where
        )
    try:
        if healthy:
            return healthy_splits(
                subjects,
                n_folds=options["n_folds"],
                test_fraction=options.get("healthy_test_fraction", 0.25),
                seed=seed,
                sizes=options.get("healthy_sizes"),
            )
        return lesion_splits(
            subjects,
            n_folds=options["n_folds"],
            val_fraction=options.get("lesion_val_fraction", 0.3),
            train_fraction=lesion_train_fraction(options, dataset),
            seed=seed,
            val_subjects=(options.get("lesion_val_subjects") or {}).get(dataset),
        )
    except InputError as err:
        raise InputError(f"{where} (dataset {dataset}): {err}") from err


def lesion_train_fraction(options: Mapping[str, Any], dataset: str) -> float:
    """``splits.lesion_train_fraction`` of ``dataset``: the number itself, or its entry when the
    setting maps datasets to fractions (0 for a dataset it does not name), so that only the
    cohorts weakly supervised methods train on give up test subjects."""
    setting = options.get("lesion_train_fraction", 0.0)
    if isinstance(setting, Mapping):
        return float(setting.get(dataset, 0.0))
    return float(setting)


def check_splits(df: pd.DataFrame, *, source: str | os.PathLike | None = None) -> None:
    """Raise InputError unless ``df`` is a valid splits table.

    Checks: columns exactly ``subject, split, fold``; no missing values; split in
    {train, val, test}; folds are the integers ``0..k-1``; every fold lists the same
    subjects; no subject appears twice within one fold (in particular not in two splits).
    Messages start with ``source`` (the file) when given.
    """
    where = str(source) if source is not None else "splits table"
    if list(df.columns) != COLUMNS:
        raise InputError(f"{where}: columns {list(df.columns)}, expected {COLUMNS}")
    if df.empty:
        raise InputError(f"{where}: no rows")
    if df.isna().any().any():
        bad = df.columns[df.isna().any()].tolist()
        raise InputError(f"{where}: missing values in column(s) {bad}")
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise InputError(f"{where}: split values {unknown}, expected one of {list(SPLITS)}")
    fold = pd.to_numeric(df["fold"], errors="coerce")
    if fold.isna().any() or not (fold == fold.round()).all():
        raise InputError(f"{where}: fold must hold integers, got {sorted(set(df['fold']))[:5]}")
    folds = sorted(set(fold.astype(np.int64)))
    if folds != list(range(len(folds))):
        raise InputError(f"{where}: folds {folds}, expected 0..{len(folds) - 1} (0-based)")
    table = df.assign(fold=fold.astype(np.int64))
    counts = table.groupby(["fold", "subject"])["split"].agg(list)
    repeated = counts[counts.map(len) > 1]
    if not repeated.empty:
        (k, subject), splits = next(iter(repeated.items()))
        raise InputError(
            f"{where}: subject {subject!r} appears {len(splits)} times in fold {k} "
            f"(splits {splits}); a subject must be in exactly one split per fold"
        )
    reference = set(table.loc[table["fold"] == 0, "subject"])
    for k in folds[1:]:
        other = set(table.loc[table["fold"] == k, "subject"])
        if other != reference:
            diff = sorted(other ^ reference)[:5]
            raise InputError(
                f"{where}: fold {k} lists different subjects from fold 0 (e.g. {diff}); "
                "every fold must assign every subject"
            )


def write_splits(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Validate ``df`` and write it atomically as CSV, rows sorted by fold then subject."""
    check_splits(df, source=path)
    table = df.sort_values(["fold", "subject"], kind="stable").reset_index(drop=True)
    write_text_atomic(path, table[COLUMNS].to_csv(index=False))


def read_splits(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a splits CSV; subject ids stay strings (``"001"`` is not 1).

    Raises:
        InputError: naming ``path`` if it is missing, unreadable or invalid.
    """
    path = require_file(path, "splits file")
    try:
        df = pd.read_csv(path, dtype={"subject": str, "split": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise corrupt_file_error(path, "splits CSV (subject, split, fold)", err) from err
    df = df.replace("", np.nan)
    check_splits(df, source=path)
    df["fold"] = pd.to_numeric(df["fold"]).astype(np.int64)
    return df


def subjects_in(
    df_or_path: pd.DataFrame | str | os.PathLike, *, fold: int, split: str
) -> list[str]:
    """Sorted subject ids assigned to ``split`` in ``fold`` (may be empty, e.g. lesion train).

    Raises:
        InputError: unknown ``split``, or ``fold`` not in the table.
    """
    if isinstance(df_or_path, pd.DataFrame):
        df, where = df_or_path, "splits table"
    else:
        df, where = read_splits(df_or_path), str(df_or_path)
    if split not in SPLITS:
        raise InputError(f"split: {split!r}, expected one of {list(SPLITS)}")
    folds = sorted(set(df["fold"].astype(np.int64)))
    if fold not in folds:
        raise InputError(f"{where}: fold {fold} not present (folds {folds})")
    selected = df[(df["fold"].astype(np.int64) == fold) & (df["split"] == split)]
    return sorted(selected["subject"].astype(str))
