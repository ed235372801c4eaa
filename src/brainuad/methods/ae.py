"""Convolutional autoencoder baseline: reconstruct the slice, score by the residual.

The AE is the classic reconstruction baseline of brain-MRI UAD (Baur et al., "Autoencoders
for unsupervised anomaly segmentation in brain MR images: a comparative study", MedIA 2021,
https://arxiv.org/abs/2004.03271; AE row of Behrendt et al., cDDPM, arXiv 2312.04215, Table 3).
The network is MONAI's :class:`monai.networks.nets.AutoEncoder` (strided convolutions down,
transposed convolutions up, no skip connections), so the bottleneck is spatial.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.nets import AutoEncoder

from brainuad.methods.base import (
    Method,
    ScoreOutput,
    check_choice,
    reconstruction_loss,
    residual_map,
)
from brainuad.methods.registry import register


@register("ae")
class ConvAutoencoder(Method):
    """Convolutional autoencoder; anomaly map = mean over channels of |x − x̂|.

    Args:
        in_channels: number of MRI sequences C.
        channels: feature channels per encoder level (the decoder mirrors them).
        strides: stride per encoder level (2 halves H and W); same length as ``channels``.
        num_res_units: residual units per level (0: plain convolutions).
        norm: MONAI normalisation name (``"INSTANCE"``, ``"BATCH"``, ...).
        act: MONAI activation name.
        loss: ``"l1"`` or ``"l2"`` reconstruction loss.
        loss_region: ``"brain"`` (mean over brain pixels) or ``"image"`` (all pixels).
        optimizer: ``"adam"`` or ``"adamw"``; weight_decay: its weight decay.

    Input ``[B, C, H, W]`` with H and W divisible by the product of ``strides``; output
    reconstruction of the same shape (linear output layer, not clamped).
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 32

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 1,
        norm: str = "INSTANCE",
        act: str = "PRELU",
        loss: Literal["l1", "l2"] = "l1",
        loss_region: Literal["brain", "image"] = "brain",
        optimizer: Literal["adam", "adamw"] = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            channels=tuple(int(c) for c in channels),
            strides=tuple(int(s) for s in strides),
            num_res_units=int(num_res_units),
            norm=norm,
            act=act,
            loss=loss,
            loss_region=loss_region,
            optimizer=optimizer,
            weight_decay=float(weight_decay),
        )
        check_choice("loss", loss, ("l1", "l2"))
        check_choice("loss_region", loss_region, ("brain", "image"))
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        if len(channels) != len(strides):
            raise ValueError(
                f"hyperparameters channels {tuple(channels)} and strides {tuple(strides)} "
                "must have the same length"
            )
        self.network = AutoEncoder(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
            act=act,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, C, H, W]`` of ``images`` ``[B, C, H, W]``."""
        return self.network(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, brainmask = batch["image"], batch["brainmask"]
        return reconstruction_loss(
            self(images),
            images,
            brainmask,
            loss=self.hparams["loss"],
            region=self.hparams["loss_region"],
        )

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        reconstruction = self(images).float()
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)
