"""Choosing the torch device from a config string."""

from __future__ import annotations

import re

import torch

from brainuad.errors import InputError

DeviceName = str
"""``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``."""

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device: str) -> str:
    """Return ``device`` if it is a valid :data:`DeviceName`, else raise InputError.

    Only the spelling is checked, not whether this machine has the device, so a run can be
    configured on a machine without a GPU.
    """
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device):
        raise InputError(f"device={device!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return device


def resolve_device(device: DeviceName | torch.device) -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; ``"cuda"`` fails clearly when absent."""
    if isinstance(device, torch.device):
        return device
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r}, but CUDA is not available on this machine")
    return torch.device(device)
