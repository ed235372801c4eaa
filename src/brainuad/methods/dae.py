"""Denoising autoencoder (DAE): a UNet trained to remove coarse noise from healthy slices.

Kascenas, Pugeault, O'Neil, "Denoising Autoencoders for Unsupervised Anomaly Detection in
Brain MRI", MIDL 2022, PMLR 172:653–664 (https://proceedings.mlr.press/v172/kascenas22a.html;
its method: a skip-connected denoising UNet trained with upscaled low-resolution noise):
the network f sees x + ε, where ε is low-resolution Gaussian noise upsampled to the image
size, and learns to return x; at test time an anomaly is what f(x) "denoises away", so the
anomaly map is |x − f(x)|. It is the strongest non-diffusion row of the cDDPM paper
(Behrendt et al., arXiv 2312.04215, Table 3: BraTS21 Dice 45.4).

Reference code (facts checked, no code copied): AntanasKascenas/DenoisingAE,
``src/denoising.py`` — noise ``N(0, 0.2²)`` of shape ``[B, C, 16, 16]``
(``noise_res = 16``, ``noise_std = 0.2``), upsampled by ``F.upsample_bilinear`` (bilinear,
aligned corners) to the image size, ONE circular shift ``torch.roll`` by a random (dy, dx)
for the whole batch, multiplied by the foreground mask ``x.sum(dim=1) > 0.01`` (added only
where the image is non-zero); loss ``mean((f(x̃) − x)² · mask)`` over ALL pixels (masked,
not renormalised by the mask's area); Adam, lr 1e-4, ``amsgrad=True``, weight decay 1e-5;
``CosineAnnealingLR`` stepped once per epoch; batch 16; map
``mean_c |x − f(x)|``, the reference then masks it with an eroded foreground and median
filters it (5 × 5), which this project's shared post-processing does. ``src/unet.py``:
UNet of depth 4 with 2^6 = 64 base filters (64-128-256-512), two 3 × 3 convolutions per
level (weight-standardised, Swish, GroupNorm), average pooling down, transposed
convolutions up, reflection padding.

Deviations from the reference:

- Network: MONAI's :class:`~monai.networks.nets.DynUNet`, the MONAI UNet closest to the
  reference (configurable depth; two 3 × 3 conv–norm–act per level; transposed-conv
  upsampling; GroupNorm and Swish chosen here), but it downsamples with strided
  convolutions instead of average pooling, pads with zeros, uses plain convolutions
  instead of weight-standardised ones, one GroupNorm group count for all levels (the
  reference picks the middle divisor per width: 8, 16, 16, 32).
- Noise is upsampled to the slice size (the reference hard-codes 128 × 128, its image
  size), so the grid always spans the whole slice; to keep the reference's cell of 128 / 16
  = 8 px at another size, set ``noise_resolution`` to size / 8 (e.g. 8 at 64 px).
- Cosine annealing over the whole run (``T_max`` = the run's steps, stepped per step)
  unless ``lr_cosine_steps`` is given; the reference's ``T_max = 100`` epochs of 32 steps
  with 2100 epochs makes the learning rate rise and fall periodically (PyTorch's
  ``CosineAnnealingLR`` continues the cosine past ``T_max``): ``lr_cosine_steps=3200``
  reproduces that.
- Random numbers from torch's global RNG (the reference uses Python's ``random`` for the
  shift).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet

from brainuad.errors import InputError
from brainuad.methods.base import FINAL_STAGE, Method, ScoreOutput, residual_map
from brainuad.methods.registry import register

# The reference's foreground: where the channel sum of the clean image exceeds this.
FOREGROUND_THRESHOLD = 0.01


def foreground_mask(images: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 1, H, W]``: 1 where ``images`` ``[B, C, H, W]`` is non-zero (sum > 0.01)."""
    return (images.sum(dim=1, keepdim=True) > FOREGROUND_THRESHOLD).to(images.dtype)


def coarse_noise(
    images: torch.Tensor,
    *,
    resolution: int = 16,
    std: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DAE's coarse noise for ``images`` ``[B, C, H, W]``, zero outside the foreground.

    ``N(0, std²)`` drawn at ``[B, C, resolution, resolution]``, upsampled bilinearly with
    aligned corners to ``[H, W]``, rolled circularly by one random (dy, dx) for the whole
    batch, multiplied by :func:`foreground_mask`. Draws from ``generator`` (CPU) or the
    global torch RNG.
    """
    b, c, h, w = images.shape
    low = torch.randn(b, c, resolution, resolution, generator=generator) * std
    shift = (
        torch.randint(0, h, (1,), generator=generator),
        torch.randint(0, w, (1,), generator=generator),
    )
    noise = F.interpolate(
        low.to(images.device, torch.float32), size=(h, w), mode="bilinear", align_corners=True
    )
    noise = torch.roll(noise, shifts=(int(shift[0]), int(shift[1])), dims=(-2, -1))
    return noise.to(images.dtype) * foreground_mask(images)


def gaussian_blur_map(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``maps`` ``[B, H, W]`` with σ in pixels (kernel truncated at 4σ)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[None, None, :, None])
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[None, None, None])
    return x[:, 0]


@register("dae")
class DenoisingAutoencoder(Method):
    """UNet denoising autoencoder; anomaly map = mean over channels of |x − f(x)|.

    Args:
        in_channels: number of MRI sequences C (reference: 4, all BraTS sequences).
        channels: filters per UNet level (reference: 64, 128, 256, 512); the number of
            levels is its length, and H, W must be divisible by 2^(levels − 1).
        norm_num_groups: GroupNorm groups, dividing every entry of ``channels``.
        act: MONAI activation name (reference: Swish).
        noise_resolution: side of the coarse noise grid (reference: 16).
        noise_std: standard deviation of the coarse noise (reference: 0.2).
        weight_decay: Adam weight decay (reference: 1e-5); the optimiser is Adam with
            ``amsgrad=True``.
        lr_cosine_steps: ``T_max`` of the cosine learning-rate annealing in steps; None
            anneals over the whole run (to 0 at its last step).
        map_blur_sigma: σ in pixels of a Gaussian blur of the anomaly map, 0 for none
            (UPD_study's DAE blurs with σ = 4; the reference median-filters instead).

    ``map_blur_sigma`` only affects scoring. Input ``[B, C, H, W]`` in [0, 1], 0 outside
    the brain.
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 16
    scoring_hparams = frozenset({"map_blur_sigma"})

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        norm_num_groups: int = 8,
        act: str = "SWISH",
        noise_resolution: int = 16,
        noise_std: float = 0.2,
        weight_decay: float = 1e-5,
        lr_cosine_steps: int | None = None,
        map_blur_sigma: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            channels=tuple(int(c) for c in channels),
            norm_num_groups=int(norm_num_groups),
            act=act,
            noise_resolution=int(noise_resolution),
            noise_std=float(noise_std),
            weight_decay=float(weight_decay),
            lr_cosine_steps=None if lr_cosine_steps is None else int(lr_cosine_steps),
            map_blur_sigma=float(map_blur_sigma),
        )
        if len(channels) < 3:
            # MONAI's DynUNet needs at least three levels.
            raise InputError(f"hyperparameter channels={tuple(channels)}, expected ≥ 3 levels")
        if any(c % norm_num_groups for c in channels):
            raise InputError(
                f"hyperparameter norm_num_groups={norm_num_groups} must divide every entry "
                f"of channels {tuple(channels)}"
            )
        if noise_resolution < 2 or noise_std < 0:
            raise InputError(
                f"hyperparameters noise_resolution={noise_resolution} (expected ≥ 2) and "
                f"noise_std={noise_std} (expected ≥ 0)"
            )
        if lr_cosine_steps is not None and lr_cosine_steps < 1:
            raise InputError(f"hyperparameter lr_cosine_steps={lr_cosine_steps}, expected ≥ 1")
        if map_blur_sigma < 0:
            raise InputError(f"hyperparameter map_blur_sigma={map_blur_sigma}, expected ≥ 0")
        levels = len(channels)
        self.network = DynUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            kernel_size=[3] * levels,
            strides=[1] + [2] * (levels - 1),
            upsample_kernel_size=[2] * (levels - 1),
            filters=list(channels),
            norm_name=("GROUP", {"num_groups": norm_num_groups}),
            act_name=act,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Denoised ``[B, C, H, W]`` of ``images`` ``[B, C, H, W]``."""
        return self.network(images)

    def add_noise(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x + coarse noise (only where x is non-zero), ``[B, C, H, W]``."""
        return images + coarse_noise(
            images,
            resolution=self.hparams["noise_resolution"],
            std=self.hparams["noise_std"],
            generator=generator,
        )

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"].float()
        denoised = self(self.add_noise(images)).float()
        # Squared error on the foreground, averaged over all pixels (as the reference).
        return ((denoised - images).square() * foreground_mask(images)).mean()

    def configure_optimizer(
        self, learning_rate: float, stage: str = FINAL_STAGE
    ) -> torch.optim.Optimizer:
        """Adam with AMSGrad and the ``weight_decay`` hyperparameter (the reference's)."""
        return torch.optim.Adam(
            self.stage_parameters(stage),
            lr=learning_rate,
            amsgrad=True,
            weight_decay=self.hparams["weight_decay"],
        )

    def configure_lr_scheduler(
        self, optimizer: torch.optim.Optimizer, max_steps: int, stage: str = FINAL_STAGE
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine annealing with ``T_max`` = ``lr_cosine_steps`` or the run's ``max_steps``."""
        t_max = self.hparams["lr_cosine_steps"] or max_steps
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(t_max)))

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        reconstruction = self(images).float()
        anomaly_map = residual_map(images, reconstruction)
        if self.hparams["map_blur_sigma"] > 0:
            anomaly_map = gaussian_blur_map(anomaly_map, self.hparams["map_blur_sigma"])
        return ScoreOutput(anomaly_map, reconstruction)
