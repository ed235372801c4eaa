"""Seeds and provenance: one place that makes runs repeatable and records how they were made."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import brainuad

_RECORDED_PACKAGES = (
    "torch",
    "monai",
    "antspyx",
    "deepbet",
    "nilearn",
    "nibabel",
    "h5py",
    "numpy",
    "scipy",
    "scikit-learn",
    "scikit-image",
    "pandas",
    "seaborn",
    "snakemake",
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) PyTorch, and ask PyTorch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency, but keep data stages light
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The current git commit of ``repo`` (default: this package's checkout), or "unknown"."""
    cwd = Path(repo) if repo is not None else Path(brainuad.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes the results."""
    versions = {"python": platform.python_version(), "brainuad": brainuad.__version__}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready record of commit, library versions, machine and (optionally) config."""
    record: dict[str, Any] = {
        "git_commit": git_commit(),
        "versions": library_versions(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
    }
    if config is not None:
        record["config"] = config
    return record
