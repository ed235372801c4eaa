"""Reading rows of HDF5 datasets, shared by the slice-file and scores-file readers."""

from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np


def read_rows(dataset: h5py.Dataset, rows: np.ndarray | Sequence[int]) -> np.ndarray:
    """Read ``dataset[rows]`` along the first axis, for rows in any order and with repeats.

    h5py's fancy indexing only takes increasing, unique indices, so the unique rows are
    read (each chunk touched once) and the result is then put back in the order asked for.

    Args:
        dataset: an HDF5 dataset of shape ``[N, ...]``.
        rows: integer row indices in ``[0, N)``.

    Returns:
        Array of shape ``[len(rows), ...]``, row ``i`` being ``dataset[rows[i]]``.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique][inverse]
