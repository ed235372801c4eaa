"""DDPM for anomaly detection by one-step reconstruction (Behrendt et al., MIDL 2023).

Behrendt, Bhattacharya, Krüger, Opfer, Schlaefer, "Patched Diffusion Models for Unsupervised
Anomaly Detection in Brain MRI", MIDL 2023 (https://arxiv.org/abs/2303.03758); its
non-patched DDPM is the baseline the cDDPM (arXiv 2312.04215) extends.

Training: x0 ∈ [0, 1] is mapped to [-1, 1]; t ~ U{0, …, T−1}; noise ε;
``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` (q(x_t | x0), cosine schedule, T = 1000); the UNet
predicts x0 directly; loss L1(x̂0, x0) over the image.
Scoring: noise x0 to t = ``test_timestep`` and predict x̂0 in ONE step (no iterative reverse
process); anomaly map |x − x̂0| averaged over channels, both in [0, 1].

Reference code (facts checked, no code copied): FinnBehrendt/patched-Diffusion-Models-UAD,
``src/models/DDPM_2D_patched.py`` (UNet: model_channels 128, dim_mults [1, 2, 2],
num_res_blocks 3, num_head_channels 64, resblock_updown, attention only in the middle block
because its attention_resolutions (6, 12, 24) never match the downsampling rates 1, 2, 4;
``t = test_timesteps − 1`` at test time), ``src/models/modules/cond_DDPM.py`` (cosine
schedule, ``normalize_to_neg_one_to_one``, pred_x0, L1 over all pixels, no brain mask),
``configs/experiment/MIDL23_DDPM/DDPM_patched.yaml`` (test_timesteps 500, simplex noise,
1600 epochs, seed 3141); Adam with lr 1e-4 and batch 32 as in /work/shared/REFERENCES.md.

Deviations from the reference:
- MONAI ``DiffusionModelUNet`` instead of the OpenAI UNet (additive time embedding instead of
  scale-shift norm; no gradient checkpointing; fp32 weights, bf16 autocast on CUDA only).
- Noise is a setting: ``noise="simplex"`` is the reference's (Behrendt's 2D simplex noise,
  :mod:`brainuad.noise`, in training and at test time), ``"gaussian"`` the classic DDPM;
  both run side by side as study variants (``ddpm``, ``ddpm_simplex``).
- No patching (this is the plain DDPM row of the paper, not pDDPM).
- No EMA (the reference has none either). Intensity augmentation, the reference's epochs
  (one slice per volume) and best-validation checkpoint selection are training settings
  (``training.augmentation``, ``max_epochs`` with ``sampler: volumes``,
  ``score_checkpoint: best``), set as the reference in ``config/paper.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from monai.networks.schedulers import DDPMScheduler

from brainuad.errors import InputError
from brainuad.methods.base import (
    Method,
    ScoreOutput,
    check_choice,
    reconstruction_loss,
    residual_map,
)
from brainuad.methods.diffusion_unet import build_diffusion_unet
from brainuad.methods.registry import register
from brainuad.noise import build_noise


@register("ddpm")
class DDPM(Method):
    """Denoising diffusion model scored by one-step x0 reconstruction from t = 500.

    Args:
        in_channels: number of MRI sequences C.
        channels: UNet feature channels per level (paper: 128 × [1, 2, 2]).
        attention_levels: self-attention per level (paper: none; the middle block always
            has attention).
        num_res_blocks: residual blocks per level (paper: 3).
        num_head_channels: channels per attention head (paper: 64).
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        resblock_updown: down/upsample with residual blocks (paper: True).
        num_train_timesteps: T (paper: 1000).
        schedule: MONAI noise schedule name (paper: ``"cosine"``).
        test_timestep: noise level of scoring in the paper's 1-based count, 1 … T (paper:
            500, i.e. scheduler index 499).
        noise: ``"simplex"`` (the reference's: 2D, 6 octaves, persistence 0.8, frequency 64,
            not unit variance), ``"gaussian"`` or ``"simplex_3d"`` (AnoDDPM's flavour);
            the same noise serves training and the scoring step.
        noise_settings: settings of the simplex noise (``octaves``, ``persistence``,
            ``frequency``, ``normalise``); default the reference's.
        loss: ``"l1"`` (paper) or ``"l2"`` between x̂0 and x0.
        loss_region: ``"image"`` (paper: all pixels) or ``"brain"``.
        score_seed: seed of the scoring noise.

        ``test_timestep`` and ``score_seed`` only affect scoring (``scoring_hparams``):
        changing them re-scores a trained model without retraining it.
        optimizer: ``"adam"`` (paper) or ``"adamw"``; weight_decay: its weight decay.

    Input ``[B, C, H, W]`` in [0, 1], H and W divisible by 2^(len(channels) − 1).
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 32
    scoring_hparams = frozenset({"test_timestep", "score_seed"})

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 256, 256),
        attention_levels: Sequence[bool] = (False, False, False),
        num_res_blocks: int = 3,
        num_head_channels: int = 64,
        norm_num_groups: int = 32,
        resblock_updown: bool = True,
        num_train_timesteps: int = 1000,
        schedule: str = "cosine",
        test_timestep: int = 500,
        noise: Literal["gaussian", "simplex", "simplex_3d"] = "simplex",
        noise_settings: dict[str, Any] | None = None,
        loss: Literal["l1", "l2"] = "l1",
        loss_region: Literal["brain", "image"] = "image",
        score_seed: int = 0,
        optimizer: Literal["adam", "adamw"] = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            channels=tuple(int(c) for c in channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=int(num_res_blocks),
            num_head_channels=int(num_head_channels),
            norm_num_groups=int(norm_num_groups),
            resblock_updown=bool(resblock_updown),
            num_train_timesteps=int(num_train_timesteps),
            schedule=schedule,
            test_timestep=int(test_timestep),
            noise=noise,
            noise_settings=dict(noise_settings or {}),
            loss=loss,
            loss_region=loss_region,
            score_seed=int(score_seed),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
        )
        check_choice("noise", noise, ("gaussian", "simplex", "simplex_3d"))
        self.noise = build_noise(noise, **(noise_settings or {}))
        check_choice("loss", loss, ("l1", "l2"))
        check_choice("loss_region", loss_region, ("brain", "image"))
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        if not 1 <= test_timestep <= num_train_timesteps:
            raise InputError(
                f"hyperparameter test_timestep={test_timestep}, expected 1 … "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        self.unet = build_diffusion_unet(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
        )
        # The scheduler holds only constants derived from the hyperparameters (nothing to
        # save), and we never call its `step`: scoring is a single x0 prediction.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            prediction_type="sample",
        )

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted x0 in [-1, 1] scale ``[B, C, H, W]`` from x_t ``[B, C, H, W]``, t ``[B]``."""
        return self.unet(noisy, timesteps)

    def _draw_noise(
        self,
        like: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise shaped like ``like`` ``[B, C, H, W]`` for ``timesteps`` ``[B]``."""
        return self.noise(
            like.shape, timesteps, generator=generator, device=like.device, dtype=like.dtype
        )

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"].float() * 2 - 1
        t = torch.randint(
            0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device
        ).long()
        noisy = self.scheduler.add_noise(x0, self._draw_noise(x0, t), t)
        predicted = self(noisy, t)
        return reconstruction_loss(
            predicted,
            x0,
            batch["brainmask"],
            loss=self.hparams["loss"],
            region=self.hparams["loss_region"],
        )

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        x0 = images.float() * 2 - 1
        index = self.hparams["test_timestep"] - 1
        t = torch.full((x0.shape[0],), index, device=x0.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(x0, self._draw_noise(x0, t, generator), t)
        reconstruction = (self(noisy, t).float() + 1) / 2
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)
