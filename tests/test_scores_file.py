"""The scores-file contract: atomic, complete writes and order-preserving reads."""

from pathlib import Path

import numpy as np
import pytest

from brainuad.io.scores import ScoresFile, ScoresWriter


def write(path: Path, n: int = 5) -> np.ndarray:
    maps = np.arange(n * 4 * 4, dtype=np.float32).reshape(n, 4, 4)
    with ScoresWriter(path, rows=np.arange(10, 10 + n), height=4, width=4, channels=1,
                      attrs={"split": "val"}) as writer:  # fmt: skip
        writer.write(maps[:2], maps[:2, None])
        writer.write(maps[2:], maps[2:, None])
    return maps


def test_read_keeps_order_and_repeats(tmp_path: Path) -> None:
    maps = write(tmp_path / "s.h5")
    scores = ScoresFile(tmp_path / "s.h5")
    out = scores.read([3, 0, 3], reconstruction=True)
    np.testing.assert_array_equal(out["anomaly_map"], maps[[3, 0, 3]])
    np.testing.assert_array_equal(out["reconstruction"][:, 0], maps[[3, 0, 3]])
    np.testing.assert_array_equal(out["row"], [13, 10, 13])
    assert scores.attrs["split"] == "val"


def test_incomplete_write_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    writer = ScoresWriter(path, rows=np.arange(5), height=4, width=4, channels=None, attrs={})
    with pytest.raises(ValueError, match="wrote 2 of 5 rows"), writer:
        writer.write(np.zeros((2, 4, 4), np.float32))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
