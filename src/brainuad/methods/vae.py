"""Variational autoencoder (VAE) baseline: reconstruct through a Gaussian latent, score by
the residual.

Kingma and Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (ELBO, reparameterisation);
for brain-MRI anomaly localisation Zimmerer et al., "Unsupervised anomaly localization using
variational auto-encoders", MICCAI 2019, and the VAE rows of Baur et al. (MedIA 2021,
https://arxiv.org/abs/2004.03271) and Bercea et al., GenAI_UAD ("Evaluating normative
representation learning in generative AI for robust anomaly detection in brain imaging",
Nature Communications 2025).

Loss (negative ELBO per slice, averaged over the batch), with a Gaussian decoder of fixed
σ = exp(``rec_log_std``) and KL weight β (``kl_weight``):

    L = Σ_pixels (x − x̂)² / (2σ²) + β · KL(N(μ, diag σ_z²) ‖ N(0, I))

(the constant log-normaliser of the Gaussian is dropped). Scoring decodes the posterior
mean μ (no sampling), so maps are deterministic: map = mean over channels of |x − x̂|.

Reference code (facts checked, no code copied): ci-ber/GenAI_UAD,
``projects/24_normative_eval/configs/vae.yaml`` (``model_zoo.vae_hahn.VAE`` with
``h_size`` 16-32-64-256-256, ``z_dim`` 256, 128 × 128 inputs; ``VAELoss`` with
``rec_log_std 0``; lr 5e-4 and batch 8 as shipped, 1e-4 and 128 commented as the
original; 1500 epochs, plateau scheduler) and ``model_zoo/vae_hahn.py`` (from
MIC-DKFZ/vae-anomaly-experiments: stride-2 4 × 4 convolutions, LeakyReLU, no
normalisation, a final convolution to a 1 × 1 latent of 2 × 256 channels (μ, log σ);
the decoder mirrors it with transposed convolutions and a linear output; loss = mean over
the batch of Σ KL − Σ log N(x̂; x, 1)).

Deviations from the reference:

- Network: MONAI's :class:`~monai.networks.nets.VarAutoEncoder` (strided 3 × 3
  convolutions, linear layers to μ and log σ² from the flattened last feature map, its
  decoder mirrored with transposed convolutions) instead of the 4 × 4-kernel
  fully-convolutional one; same widths and latent size, LeakyReLU and no normalisation
  by default, linear output (no sigmoid).
- MONAI's own ``forward`` is not used: in eval mode it returns μ + σ (not μ) unless
  ``use_mean_at_inference``; here the encoder, the reparameterisation (training only,
  global torch RNG) and the decoder are called directly.
- The reference's KL uses ``exp(σ)`` as the posterior standard deviation (its encoder
  output named ``z_logvar`` is already ``exp(log σ)``, and the loss exponentiates it
  again), and it samples z at test time (``get_anomaly`` calls ``forward`` with
  ``sample=True``); neither is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import VarAutoEncoder

from brainuad.errors import InputError
from brainuad.methods.base import Method, ScoreOutput, check_choice, residual_map
from brainuad.methods.registry import register


@register("vae")
class VariationalAutoencoder(Method):
    """VAE with a dense Gaussian latent; anomaly map = mean over channels of |x − x̂(μ)|.

    Args:
        in_channels: number of MRI sequences C.
        image_size: slice side H = W the dense layers are built for (reference: 128).
        channels: encoder widths, one stride-2 level each (reference: 16, 32, 64, 256, 256).
        latent_size: dimension of z (reference: 256).
        kl_weight: β, the weight of the KL term (reference: 1).
        rec_log_std: log σ of the Gaussian decoder likelihood (reference: 0, i.e. σ = 1).
        act: MONAI activation name (reference: LeakyReLU).
        norm: MONAI normalisation name, or None (reference: none).
        optimizer: ``"adam"`` (reference) or ``"adamw"``; weight_decay: its weight decay.

    Input ``[B, C, H, W]`` with H = W = ``image_size`` divisible by 2^len(channels).
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 5e-4
    default_batch_size = 8

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 128,
        channels: Sequence[int] = (16, 32, 64, 256, 256),
        latent_size: int = 256,
        kl_weight: float = 1.0,
        rec_log_std: float = 0.0,
        act: str = "LEAKYRELU",
        norm: str | None = None,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            image_size=int(image_size),
            channels=tuple(int(c) for c in channels),
            latent_size=int(latent_size),
            kl_weight=float(kl_weight),
            rec_log_std=float(rec_log_std),
            act=act,
            norm=norm,
            optimizer=optimizer,
            weight_decay=float(weight_decay),
        )
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        factor = 2 ** len(channels)
        if image_size % factor or image_size < factor:
            raise InputError(
                f"hyperparameter image_size={image_size} must be a multiple of "
                f"2^len(channels) = {factor} (channels {tuple(channels)})"
            )
        if kl_weight < 0 or latent_size < 1:
            raise InputError(
                f"hyperparameters kl_weight={kl_weight} (expected ≥ 0) and "
                f"latent_size={latent_size} (expected ≥ 1)"
            )
        self.network = VarAutoEncoder(
            spatial_dims=2,
            in_shape=(in_channels, image_size, image_size),
            out_channels=in_channels,
            latent_size=latent_size,
            channels=tuple(channels),
            strides=(2,) * len(channels),
            act=act,
            norm=norm,
            use_sigmoid=False,
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior μ and log σ² ``[B, latent_size]`` of ``images`` ``[B, C, H, W]``."""
        h, w = images.shape[-2:]
        size = self.hparams["image_size"]
        if (h, w) != (size, size):
            raise InputError(
                f"{self.name}: slices of {h} × {w} px, but the model is built for image_size={size}"
            )
        return self.network.encode_forward(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, C, H, W]`` from latents ``[B, latent_size]``."""
        return self.network.decode_forward(z, use_sigmoid=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction from the posterior mean, ``[B, C, H, W]``."""
        mu, _ = self.encode(images)
        return self.decode(mu)

    def elbo_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice reconstruction term and KL divergence ``[B]`` (one sampled z each)."""
        mu, logvar = self.encode(images)
        mu, logvar = mu.float(), logvar.float()
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        reconstruction = self.decode(z).float()
        variance = math.exp(2 * self.hparams["rec_log_std"])
        rec = (reconstruction - images.float()).square().flatten(1).sum(1) / (2 * variance)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        return rec, kl

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rec, kl = self.elbo_terms(batch["image"])
        return (rec + self.hparams["kl_weight"] * kl).mean()

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        reconstruction = self(images).float()
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)
