"""Exponential moving average (EMA) of a network's weights, as diffusion models score them.

Several references (AnoDDPM, Wolleb et al., AnoFPDM, all after guided-diffusion) train a
network and score a copy whose parameters follow ``θ_ema ← d · θ_ema + (1 − d) · θ`` after every
optimiser step, starting from the initial weights. :class:`EMAWeights` is that copy as a
submodule of the method: its weights are part of the method's ``state_dict``, so they are
saved in ``model.pt``, checkpointed and restored on resume by the one training loop without
any code there. The method updates it in ``Method.after_optimizer_step`` and scores with it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from brainuad.errors import InputError


class EMAWeights(torch.nn.Module):
    """A frozen copy of ``source`` whose parameters are an exponential moving average.

    Args:
        source: the trained network; copied at construction (the EMA starts from its
            initial weights, as the references' ``copy.deepcopy(model)``).
        decay: d in ``θ_ema ← d θ_ema + (1 − d) θ`` (references: 0.9999), in [0, 1).

    Buffers (e.g. BatchNorm statistics) are copied from the source, not averaged.
    Calling the module runs the averaged network.
    """

    def __init__(self, source: torch.nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise InputError(f"EMA decay={decay!r}, expected 0 ≤ decay < 1")
        self.decay = float(decay)
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, source: torch.nn.Module) -> None:
        """One EMA step towards the current weights of ``source`` (same architecture)."""
        for averaged, current in zip(self.module.parameters(), source.parameters(), strict=True):
            averaged.lerp_(current.detach().to(averaged.dtype), 1.0 - self.decay)
        for averaged, current in zip(self.module.buffers(), source.buffers(), strict=True):
            averaged.copy_(current)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


__all__ = ["EMAWeights"]
