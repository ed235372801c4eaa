"""Opening intermediate files: one place that turns a library error into a clear message.

Every reader of a file the workflow made (slice and scores HDF5 files, model and checkpoint
files, ``threshold.json``, splits and subject sheets) opens it through these helpers, so a
truncated or otherwise damaged file gives one :class:`~brainuad.errors.CorruptFileError`
that names the path, what the file should have been, the library's own words, and what to
do about it, instead of h5py's "Unable to synchronously open file (truncated file …)" or
torch's "PytorchStreamReader failed reading zip archive" without any path.

The advice is the same for every intermediate file: delete it and rerun; Snakemake rebuilds
a missing file (and, because it is then newer, whatever was made from it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from brainuad.errors import CorruptFileError, InputError


def rebuild_advice(path: str | os.PathLike) -> str:
    """What to tell the user to do about a damaged intermediate file ``path``."""
    return (
        f"delete it and rerun snakemake, which rebuilds it (or run `snakemake --forcerun {path}`)"
    )


def corrupt_file_error(
    path: str | os.PathLike, what: str, error: BaseException | str
) -> CorruptFileError:
    """The one message for a file that exists but cannot be read as ``what``.

    Args:
        path: the file.
        what: what it should be, e.g. ``"slice file (HDF5)"``.
        error: the library's exception (or a description of what was wrong).
    """
    detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    return CorruptFileError(
        f"{path}: not a readable {what} ({detail}); the file is damaged or incomplete: "
        f"{rebuild_advice(path)}",
        path=Path(path),
    )


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; InputError naming it and ``what`` if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} does not exist")
    return path


@contextlib.contextmanager
def open_hdf5(path: str | os.PathLike, what: str) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; a missing or damaged file raises an error naming it.

    Errors raised while the block reads datasets (a chunk cut off by truncation, a missing
    dataset) are turned into the same :class:`CorruptFileError`.
    """
    path = require_file(path, what)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise corrupt_file_error(path, what, err) from err
    try:
        with hdf5_errors(path, what):
            yield handle
    finally:
        handle.close()


@contextlib.contextmanager
def hdf5_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn h5py's read errors (OSError; KeyError for a missing dataset) inside the block
    into a :class:`CorruptFileError` naming ``path``; for readers that keep a file open."""
    try:
        yield
    except CorruptFileError:
        raise
    except (OSError, KeyError) as err:
        raise corrupt_file_error(path, what, err) from err


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file the workflow wrote; a missing or damaged file names the path."""
    path = require_file(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt_file_error(path, what, err) from err
