"""Atomic output: write to a temporary sibling, then rename over the target.

A killed job therefore never leaves a half-written file under its final name, and
Snakemake's "output exists" check stays trustworthy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which would briefly give
# files created by other threads the permissive umask 0.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    Args:
        path: final destination. Its parent folder is created.
        suffix: suffix of the temporary file (defaults to the full suffix of ``path``,
            e.g. ``.nii.gz``, so libraries that dispatch on the extension still work).

    The temporary file is removed if the body raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give outputs the usual permissions (shared cluster folders).
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries that a killed :func:`atomic_path` write left next to ``path``.

    SIGKILL (pre-emption, a time limit) skips the clean-up in :func:`atomic_path`, so a job
    killed while writing a large checkpoint leaves a full-size ``.{name}.*.tmp*`` file. Call
    this only from the one job that owns ``path`` (e.g. at the start of a resumed training
    run), never while another process may be writing it.

    Returns:
        The files removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp*"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
