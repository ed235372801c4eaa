"""Saving and loading torch files (models, training checkpoints): byte-stable and named.

``torch.save(obj, path)`` names the folder inside its zip archive after the file, so a file
written through a temporary name (:func:`brainuad.io.atomic.atomic_path`) carries that random
name and two saves of identical weights never have the same bytes. :func:`save_torch`
serialises into memory first (the archive folder is then always ``archive``) and writes the
bytes atomically: identical objects give identical files, comparable by checksum.

:func:`load_torch` loads with ``weights_only=True`` and turns torch's errors on a damaged file
("PytorchStreamReader failed reading zip archive", EOF, unpickling errors) into one
:class:`~brainuad.errors.CorruptFileError` naming the file (:mod:`brainuad.io.readers`).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from brainuad.errors import CorruptFileError
from brainuad.io.atomic import atomic_path, remove_stale_temporaries
from brainuad.io.readers import corrupt_file_error, require_file

_LOGGER = logging.getLogger(__name__)


def torch_bytes(obj: Any) -> bytes:
    """``obj`` serialised by ``torch.save`` in memory (the same bytes for the same object)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` with ``torch.save``, atomically and byte-stable."""
    data = torch_bytes(obj)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_torch(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing or damaged file names ``path``.

    Args:
        path: the file.
        what: what it should be, for the message (e.g. ``"brainuad model file"``).
        map_location: as for ``torch.load``.

    Raises:
        InputError: the file does not exist.
        CorruptFileError: torch cannot read it.
    """
    path = require_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        # the legacy (non-zip) reader pops an empty stack on bytes that are no pickle
        IndexError,
    ) as err:
        raise corrupt_file_error(path, what, err) from err


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_keeping_previous` keeps the file it replaces: ``last.pt`` ->
    ``last.previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_keeping_previous(obj: Any, path: str | os.PathLike) -> None:
    """:func:`save_torch` to ``path``, first moving an existing ``path`` to
    :func:`previous_path`, so the last two saves survive (a training checkpoint whose newest
    copy is damaged then resumes from the one before)."""
    path = Path(path)
    data = torch_bytes(obj)
    if path.exists():
        # Link (or copy), never rename: ``path`` exists at every moment, so a job killed
        # here still leaves its newest checkpoint under its usual name.
        previous = previous_path(path)
        remove_stale_temporaries(previous)
        with atomic_path(previous) as tmp:
            tmp.unlink()
            try:
                os.link(path, tmp)
            except OSError:  # file systems without hard links
                shutil.copyfile(path, tmp)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_newest_readable(
    path: str | os.PathLike, what: str, logger: logging.Logger | None = None
) -> tuple[Any, Path] | None:
    """Load ``path``, or its :func:`previous_path` copy when ``path`` is damaged.

    A damaged copy is moved aside to ``<name>.corrupt`` (kept for inspection, and no longer
    in the way of the next save) with a warning; so a run whose newest checkpoint was
    truncated resumes from the previous one instead of failing. An absent ``path`` means
    "start over" (:func:`save_keeping_previous` never leaves it absent; a user deletes it to
    restart), whatever previous copy is left.

    Returns:
        ``(object, the path it was read from)``, or None when ``path`` does not exist or
        both copies are damaged (start from scratch).
    """
    log = logger or _LOGGER
    path = Path(path)
    if not path.exists():
        return None
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            return load_torch(candidate, what), candidate
        except CorruptFileError as err:
            aside = candidate.with_name(candidate.name + ".corrupt")
            os.replace(candidate, aside)
            log.warning("%s; moved it aside to %s", err, aside)
    return None
