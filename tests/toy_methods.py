"""Toy methods that exercise the framework: two stages, and weak supervision.

Imported by the tests (and by the workflow tests through the config's ``method_modules``, with
this folder on PYTHONPATH), never by the package: they show that a study's own method,
kept outside ``brainuad``, plugs into the registry, the stages and the data choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainuad.methods import Method, ScoreOutput, register
from brainuad.methods.base import Stage, residual_map
from brainuad.methods.registry import _REGISTRY


def _conv(in_channels: int, out_channels: int) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ToyTwoStage(Method):
    """A two-stage autoencoder: ``pretrain`` fits ``encoder`` (with its own head) to
    reconstruct the slice; ``model`` starts from that encoder and trains encoder + decoder.
    Map |x − x̂|."""

    stages = (
        Stage("pretrain", modules=("encoder", "pretrain_head")),
        Stage("model", consumes=("pretrain",), modules=("encoder", "decoder")),
    )

    def __init__(self, *, in_channels: int = 1, width: int = 4) -> None:
        super().__init__(in_channels=in_channels, width=width)
        self.encoder = _conv(in_channels, width)
        self.pretrain_head = _conv(width, in_channels)
        self.decoder = _conv(width, in_channels)

    def stage_loss(self, stage, batch):
        head = self.pretrain_head if stage == "pretrain" else self.decoder
        x = batch["image"].float()
        return F.l1_loss(head(torch.relu(self.encoder(x))), x)

    def training_loss(self, batch):
        return self.stage_loss("model", batch)

    def _score(self, images, brainmask, generator):
        reconstruction = self.decoder(torch.relu(self.encoder(images.float())))
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)


class ToyWeak(Method):
    """Weakly supervised: a per-pixel logit map from one convolution; the slice logit is its
    maximum (multiple-instance learning), trained with binary cross-entropy on the slice
    label. Map = sigmoid of the pixel logits."""

    supervision = "image_labels"
    has_reconstruction = False

    def __init__(self, *, in_channels: int = 1) -> None:
        super().__init__(in_channels=in_channels)
        self.pixel_logits = _conv(in_channels, 1)

    def training_loss(self, batch):
        logits = self.pixel_logits(batch["image"].float()).flatten(1).amax(dim=1)
        return F.binary_cross_entropy_with_logits(logits, batch["label"].float())

    def _score(self, images, brainmask, generator):
        return ScoreOutput(torch.sigmoid(self.pixel_logits(images.float()))[:, 0])


# Registered once, even when this module is imported under two names (tests and plugins).
for _name, _cls in (("toy_two_stage", ToyTwoStage), ("toy_weak", ToyWeak)):
    if _name not in _REGISTRY:
        register(_name)(_cls)
