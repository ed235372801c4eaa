"""Choosing the torch device from a config string."""

from __future__ import annotations

from typing import Literal

import torch

from brainuad.errors import InputError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; ``"cuda"`` fails clearly when absent."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r}, but CUDA is not available on this machine")
        return torch.device(device)
    raise InputError(f"device={device!r}, expected 'auto', 'cpu' or 'cuda'")
