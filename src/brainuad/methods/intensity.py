"""Intensity baseline: the voxel intensity itself as the anomaly score, with no training.

Meissen, Kaissis, Rueckert, "Challenging Current Semi-Supervised Anomaly Segmentation Methods
for Brain MRI", MICCAI BrainLes 2021 (https://arxiv.org/abs/2109.06023), Section 3: a
threshold on the FLAIR intensity alone rivals the reconstruction methods of its time on
hyperintense lesions (BraTS, MSLUB). The cDDPM paper (Behrendt et al., arXiv 2312.04215,
Table 3) reports the same baseline as its first row. On T1, where stroke lesions are dark,
``polarity="dark"`` scores 1 − x.

The method has no trained stage (``stages = ()``): the workflow builds it from its
hyperparameters in the scoring job and never schedules a training job for it.

Deviations: none in the map itself; thresholds come from this project's calibration protocols
(the paper searches the best threshold per dataset).
"""

from __future__ import annotations

from typing import Literal

import torch

from brainuad.errors import InputError
from brainuad.methods.base import Method, ScoreOutput, check_choice
from brainuad.methods.registry import register


@register("intensity")
class IntensityBaseline(Method):
    """Anomaly map = intensity (``bright``) or 1 − intensity (``dark``), mean over channels,
    zero outside the brain.

    Args:
        in_channels: number of sequences C read (the map averages them; give the one
            sequence the baseline is about with the method's ``inputs``).
        polarity: ``"bright"`` for hyperintense lesions (FLAIR/T2), ``"dark"`` for
            hypointense ones (T1 stroke).

    Input ``[B, C, H, W]`` in [0, 1]; map ``[B, H, W]``.
    """

    supervision = "healthy"
    stages = ()
    has_reconstruction = False

    def __init__(
        self, *, in_channels: int = 1, polarity: Literal["bright", "dark"] = "bright"
    ) -> None:
        super().__init__(in_channels=int(in_channels), polarity=polarity)
        check_choice("polarity", polarity, ("bright", "dark"))
        if in_channels < 1:
            raise InputError(f"hyperparameter in_channels={in_channels}, expected ≥ 1")

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise InputError("the intensity baseline has no trained stage")

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        intensity = images.float().mean(dim=1)
        if self.hparams["polarity"] == "dark":
            intensity = 1.0 - intensity
        return ScoreOutput(intensity * brainmask[:, 0].float())
