"""Exceptions raised on bad input, so callers can tell them from bugs."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """A file or value given to brainuad is unusable.

    The message always names the file (or config field) and what is wrong with it.
    """


class CorruptFileError(InputError):
    """A file exists but cannot be read (truncated, overwritten, not the expected format).

    Attributes:
        path: the file, so that callers can move it aside (a training checkpoint) or name it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)
