"""The scores file contract: anomaly maps of one method, fold, dataset and split.

``results/scores/{method}/fold{fold}/{dataset}_{split}.h5`` holds, for the M slice-file
rows of the subjects in that split:

==============  =======  =============  ==============================================
name            dtype    shape          meaning
==============  =======  =============  ==============================================
row             int64    [M]            row in ``results/slices/{dataset}.h5``
anomaly_map     float32  [M, H, W]      raw anomaly map (no post-processing)
reconstruction  float32  [M, C, H, W]   optional: the method's pseudo-healthy image
==============  =======  =============  ==============================================

Rows are aligned one for one with the ``row`` entries, which index the slice file; so
brain masks, labels and subjects are always read from the one slice file, never copied.
Attributes: ``method``, ``fold``, ``dataset``, ``split``, ``inputs`` (the sequences the
method read, the reconstruction's channels), ``method_size`` and a JSON provenance record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path
from brainuad.io.hdf5 import read_rows
from brainuad.io.readers import corrupt_file_error, open_hdf5

#: What a scores file is, in error messages.
SCORES_FILE = "scores file (HDF5, brainuad.io.scores)"


class ScoresWriter:
    """Write a scores file batch by batch, atomically (use as a context manager)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rows: np.ndarray,
        height: int,
        width: int,
        channels: int | None,
        attrs: dict[str, Any],
    ) -> None:
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.height, self.width, self.channels = int(height), int(width), channels
        self.attrs = attrs
        self._written = 0
        self._atomic = None
        self._file: h5py.File | None = None

    def __enter__(self) -> ScoresWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        f = self._file = h5py.File(tmp, "w")
        m, h, w = self.rows.size, self.height, self.width
        f.create_dataset("row", data=self.rows)
        f.create_dataset(
            "anomaly_map",
            shape=(m, h, w),
            dtype="float32",
            chunks=(1, h, w) if m else None,
            compression="lzf" if m else None,
        )
        if self.channels is not None:
            c = self.channels
            f.create_dataset(
                "reconstruction",
                shape=(m, c, h, w),
                dtype="float32",
                chunks=(1, c, h, w) if m else None,
                compression="lzf" if m else None,
            )
        for key, value in self.attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        return self

    def write(self, anomaly_map: np.ndarray, reconstruction: np.ndarray | None = None) -> None:
        """Append a batch: ``anomaly_map`` ``[B, H, W]``, ``reconstruction`` ``[B, C, H, W]``."""
        assert self._file is not None, "use ScoresWriter as a context manager"
        b = anomaly_map.shape[0]
        start, stop = self._written, self._written + b
        if stop > self.rows.size:
            raise ValueError(f"{self.path}: more maps written than rows ({self.rows.size})")
        finite = np.isfinite(anomaly_map).reshape(b, -1).all(axis=1)
        if not finite.all():
            bad = self.rows[start:stop][~finite]
            raise InputError(
                f"{self.path}: anomaly maps of slice-file rows {bad[:5].tolist()} hold NaN or "
                "infinite values; a scores file only takes finite maps"
            )
        self._file["anomaly_map"][start:stop] = anomaly_map.astype(np.float32)
        if reconstruction is not None and "reconstruction" in self._file:
            self._file["reconstruction"][start:stop] = reconstruction.astype(np.float32)
        self._written = stop

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._atomic is not None
        self._file.close()
        incomplete = exc_type is None and self._written != self.rows.size
        if incomplete:
            # Abandon the temporary file rather than publish a partial one.
            error = ValueError(f"{self.path}: wrote {self._written} of {self.rows.size} rows")
            self._atomic.__exit__(ValueError, error, None)
            raise error
        self._atomic.__exit__(exc_type, exc, tb)


class ScoresFile:
    """Read a scores file lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open_hdf5(self.path, SCORES_FILE) as f:
            if "row" not in f or "anomaly_map" not in f:
                raise corrupt_file_error(self.path, SCORES_FILE, "needs 'row' and 'anomaly_map'")
            self.rows: np.ndarray = f["row"][:]
            self.has_reconstruction = "reconstruction" in f
            self.attrs: dict[str, Any] = dict(f.attrs)

    @property
    def inputs(self) -> list[str] | None:
        """The sequences the method read, in the order of the reconstruction's channels
        (None in files written before methods chose their inputs: all sequences)."""
        value = self.attrs.get("inputs")
        return None if value is None else list(json.loads(value))

    def read(
        self, positions: np.ndarray | slice | None = None, reconstruction: bool = False
    ) -> dict[str, np.ndarray]:
        """Read maps (and optionally reconstructions) at ``positions``.

        ``positions`` index ``rows`` (a slice, or integers in any order, repeats allowed);
        None reads every row.
        """
        sel = slice(None) if positions is None else positions
        with open_hdf5(self.path, SCORES_FILE) as f:
            if isinstance(sel, slice):
                out = {"anomaly_map": f["anomaly_map"][sel], "row": self.rows[sel]}
                if reconstruction and self.has_reconstruction:
                    out["reconstruction"] = f["reconstruction"][sel]
                return out
            idx = np.asarray(sel, dtype=np.int64)
            out = {"anomaly_map": read_rows(f["anomaly_map"], idx), "row": self.rows[idx]}
            if reconstruction and self.has_reconstruction:
                out["reconstruction"] = read_rows(f["reconstruction"], idx)
            return out
