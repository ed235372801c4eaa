"""AnoDDPM: a simplex-noise DDPM scored by a partial forward and full reverse diffusion.

Wyatt, Leach, Schmon, Willcocks, "AnoDDPM: Anomaly Detection with Denoising Diffusion
Probabilistic Models using Simplex Noise", CVPR Workshops 2022, Sec. 3–4.

Training (x0 ∈ [0, 1] mapped to [-1, 1]): t ~ U{0, …, ``train_max_timestep`` − 1} (the
paper trains only on t < 800 of T = 1000); ε = simplex noise, the slice z = t of 3D fractal
noise (:class:`brainuad.noise.SimplexNoise3D`: 6 octaves, persistence 0.8, frequency 64, one
pattern per channel shared by the batch, not unit variance);
``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` (linear β schedule 1e-4 … 0.02, T = 1000); the UNet
predicts ε; loss mean (ε̂ − ε)². AdamW, gradients clipped to norm 1, and an exponential moving
average of the weights (decay 0.9999, :class:`brainuad.training.ema.EMAWeights`) that is what
scores.
Scoring (with the EMA network): noise x0 once to t = λ = ``test_timestep`` (scheduler index
λ − 1) with simplex noise, then run the reverse process down to 0, one UNet evaluation per
step: x̂0 = (x_t' − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) with x_t' = clamp(x_t, −1, 1) (the
reference clamps x_t in this estimate), the posterior mean μ̃(x̂0, x_t), and
``x_{t−1} = μ̃ + σ_t z`` with the fixed-large variance σ_t² = β_t and FRESH simplex noise z at
z-coordinate t in every step (none at the last). Map: (x − x̂)² averaged over channels, both in
[0, 1] (the reference's squared error, on [−1, 1] it is 4 × this).

``reverse_steps`` (scoring only) shortens the chain for CPU studies: the reverse process
visits that many timesteps evenly spaced in [0, λ − 1] (always both ends) and steps between
them with the respaced schedule of Nichol & Dhariwal 2021 (β'_i = 1 − ᾱ_{s_i} / ᾱ_{s_{i−1}},
fixed-large variance β'_i); the trained model is unchanged. None (the paper): every step, λ
UNet evaluations per slice.

Reference code (facts checked, no code copied): Julian-Wyatt/AnoDDPM,
``GaussianDiffusion.py`` (``get_beta_schedule("linear")``: β from 1e-4 to 0.02 scaled by
1000 / T; ``p_loss`` with ``train_start``: t < ``sample_distance``; ``calc_loss``: L2 on ε;
``p_mean_variance``: model variance ``append(posterior_variance[1], betas[1:])`` (fixed-large)
and x̂0 from ``x_t.clamp(-1, 1)``; ``sample_p``: noise from the given noise function at the
current t, none at t = 0; ``detection_A_fixedT``: λ = 250, noised at index λ − 1, reverse
steps λ − 1 … 0 with simplex noise), ``simplex.py`` (``rand_3d_fixed_T_octaves``), ``UNet.py``
(128 base channels, multipliers (1, 1, 2, 3, 4) at 128 px, 2 residual blocks, attention at 16
and 8 px, BigGAN up/down-sampling; ``update_ema_params``: EMA of the parameters from a
deep copy of the initial model), ``diffusion_training.py`` (AdamW, weight decay 0,
``clip_grad_norm_(…, 1)``, EMA 0.9999 after every step, the EMA network tested),
``test_args/args28.json`` (simplex, linear, T = 1000, L2, lr 1e-4, batch 1, sample_distance
800, 2 heads, 3000 epochs of 100 slices at 256 px).

Deviations from the reference:
- MONAI ``DiffusionModelUNet`` (additive time embedding, attention heads of
  ``channels / num_heads`` channels) instead of the reference's UNet.
- The study's slices (96² in ``config/paper.yaml``) instead of the reference's 256²; the
  UNet is the reference's 128-px configuration with attention on its two deepest levels
  (12 and 6 px here), and the noise frequency stays 64 as in the paper.
- Batches of several slices share one simplex pattern per channel; a training batch with
  different t takes each sample's own z = t slice of that channel's 3D field (the reference
  trains at batch 1, so it never mixes timesteps).
- ``reverse_steps`` (off in ``config/paper.yaml``) is ours, for CPU studies.
- ``clamp="x0"`` (clamp x̂0 instead of x_t, as guided-diffusion does) is offered; the
  default is the reference's x_t clamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler

from brainuad.errors import InputError
from brainuad.methods.base import FINAL_STAGE, Method, ScoreOutput, check_choice
from brainuad.methods.diffusion_unet import build_diffusion_unet
from brainuad.methods.registry import register
from brainuad.noise import build_noise
from brainuad.training.ema import EMAWeights


@register("anoddpm")
class AnoDDPM(Method):
    """Simplex-noise ε-prediction DDPM scored by reconstruction from t = λ (AnoDDPM).

    Args:
        in_channels: number of MRI sequences C.
        channels: UNet feature channels per level (reference at 128 px: 128 × (1, 1, 2, 3, 4)).
        attention_levels: self-attention per level (reference: at 16 and 8 px, the two deepest
            levels at 128 px); the middle block always has attention.
        num_res_blocks: residual blocks per level (reference: 2).
        num_heads: attention heads per attention layer (reference: 2).
        norm_num_groups: GroupNorm groups (reference: 32); must divide every entry of
            ``channels``.
        resblock_updown: down/upsample with residual blocks (reference: True).
        num_train_timesteps: T (reference: 1000); the linear β range 1e-4 … 0.02 is scaled by
            1000 / T as in the reference, so ᾱ_T stays comparable for other T.
        train_max_timestep: training draws t < this (reference: 800).
        test_timestep: λ, the noise level of scoring in 1-based count (paper: 250; scheduler
            index λ − 1, λ UNet evaluations per slice without ``reverse_steps``).
        reverse_steps: None (paper): the whole reverse chain; an integer n ≥ 2: n timesteps
            evenly spaced in [0, λ − 1] with the respaced schedule (module docstring).
        noise: ``"simplex_3d"`` (reference), ``"simplex"`` or ``"gaussian"``.
        noise_settings: settings of the simplex noise (``octaves``, ``persistence``,
            ``frequency``, ``normalise``); default the reference's 6, 0.8, 64, False.
        clamp: ``"x_t"`` (reference: x_t clamped to [−1, 1] in the x̂0 estimate) or ``"x0"``
            (x̂0 clamped).
        ema_decay: decay of the EMA weights that score (reference: 0.9999).
        gradient_clip_norm: maximal gradient norm (reference: 1; 0 or None: no clipping).
        optimizer: ``"adamw"`` (reference) or ``"adam"``; weight_decay: its weight decay
            (reference: 0).
        score_seed: seed of the scoring noise.

        ``test_timestep``, ``reverse_steps``, ``clamp`` and ``score_seed`` only affect
        scoring (``scoring_hparams``).

    Input ``[B, C, H, W]`` in [0, 1], H and W divisible by 2^(len(channels) − 1).
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 1
    scoring_hparams = frozenset({"test_timestep", "reverse_steps", "clamp", "score_seed"})

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 128, 256, 384, 512),
        attention_levels: Sequence[bool] = (False, False, False, True, True),
        num_res_blocks: int = 2,
        num_heads: int = 2,
        norm_num_groups: int = 32,
        resblock_updown: bool = True,
        num_train_timesteps: int = 1000,
        train_max_timestep: int = 800,
        test_timestep: int = 250,
        reverse_steps: int | None = None,
        noise: Literal["gaussian", "simplex", "simplex_3d"] = "simplex_3d",
        noise_settings: dict[str, Any] | None = None,
        clamp: Literal["x_t", "x0"] = "x_t",
        ema_decay: float = 0.9999,
        gradient_clip_norm: float | None = 1.0,
        optimizer: Literal["adam", "adamw"] = "adamw",
        weight_decay: float = 0.0,
        score_seed: int = 0,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            channels=tuple(int(c) for c in channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=int(num_res_blocks),
            num_heads=int(num_heads),
            norm_num_groups=int(norm_num_groups),
            resblock_updown=bool(resblock_updown),
            num_train_timesteps=int(num_train_timesteps),
            train_max_timestep=int(train_max_timestep),
            test_timestep=int(test_timestep),
            reverse_steps=None if reverse_steps is None else int(reverse_steps),
            noise=noise,
            noise_settings=dict(noise_settings or {}),
            clamp=clamp,
            ema_decay=float(ema_decay),
            gradient_clip_norm=None if not gradient_clip_norm else float(gradient_clip_norm),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
            score_seed=int(score_seed),
        )
        check_choice("noise", noise, ("gaussian", "simplex", "simplex_3d"))
        check_choice("clamp", clamp, ("x_t", "x0"))
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        if num_heads < 1 or any(c % num_heads for c in channels):
            raise InputError(
                f"hyperparameter num_heads={num_heads} must be ≥ 1 and divide every entry "
                f"of channels {tuple(channels)}"
            )
        if not 1 <= train_max_timestep <= num_train_timesteps:
            raise InputError(
                f"hyperparameter train_max_timestep={train_max_timestep}, expected 1 … "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        if not 1 <= test_timestep <= num_train_timesteps:
            raise InputError(
                f"hyperparameter test_timestep={test_timestep}, expected 1 … "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        if reverse_steps is not None and not 2 <= reverse_steps <= test_timestep:
            raise InputError(
                f"hyperparameter reverse_steps={reverse_steps}, expected None (every step) "
                f"or 2 … test_timestep ({test_timestep})"
            )
        self.noise = build_noise(noise, **(noise_settings or {}))
        self.unet = build_diffusion_unet(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=tuple(c // num_heads for c in channels),
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
        )
        # The scores come from these averaged weights; a submodule, so saved and resumed.
        self.ema = EMAWeights(self.unet, decay=ema_decay)
        # Schedule constants only: MONAI's `step` draws Gaussian noise itself and clamps x̂0,
        # so the reverse step (simplex noise, the reference's x_t clamp) is written below.
        scale = 1000 / num_train_timesteps
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule="linear_beta",
            beta_start=scale * 1e-4,
            beta_end=scale * 0.02,
            prediction_type="epsilon",
        )

    # -- training --------------------------------------------------------------------------

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted noise ε̂ ``[B, C, H, W]`` of the trained (not averaged) UNet."""
        return self.unet(noisy, timesteps)

    def _draw_noise(
        self, like: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return self.noise(
            like.shape, timesteps, generator=generator, device=like.device, dtype=like.dtype
        )

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"].float() * 2 - 1
        t = torch.randint(
            0, self.hparams["train_max_timestep"], (x0.shape[0],), device=x0.device
        ).long()
        noise = self._draw_noise(x0, t, None)
        predicted = self(self.scheduler.add_noise(x0, noise, t), t)
        return (predicted.float() - noise).square().mean()

    def stage_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        """The trained UNet's parameters (never the EMA copy)."""
        self.stage(stage)
        return list(self.unet.parameters())

    def after_optimizer_step(self, stage: str = FINAL_STAGE) -> None:
        self.ema.update(self.unet)

    # -- scoring ---------------------------------------------------------------------------

    def reverse_timesteps(self) -> list[int]:
        """Scheduler indices the reverse chain evaluates, from λ − 1 down to 0."""
        start = self.hparams["test_timestep"] - 1
        steps = self.hparams["reverse_steps"]
        if steps is None:
            return list(range(start, -1, -1))
        return sorted({round(v) for v in np.linspace(0, start, steps)}, reverse=True)

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        x0 = images.float() * 2 - 1
        b = x0.shape[0]
        timesteps = self.reverse_timesteps()
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)

        def at(t: int) -> torch.Tensor:
            return torch.full((b,), t, device=x0.device, dtype=torch.long)

        start = timesteps[0]
        x = self.scheduler.add_noise(x0, self._draw_noise(x0, at(start), generator), at(start))
        for position, t in enumerate(timesteps):
            epsilon = self.ema(x, at(t)).float()
            abar = float(alphas_cumprod[t])
            source = x.clamp(-1, 1) if self.hparams["clamp"] == "x_t" else x
            x0_hat = (source - (1 - abar) ** 0.5 * epsilon) / abar**0.5
            if self.hparams["clamp"] == "x0":
                x0_hat = x0_hat.clamp(-1, 1)
            if position == len(timesteps) - 1:
                x = x0_hat  # the posterior mean at t = 0 is x̂0 itself, and no noise
                break
            abar_prev = float(alphas_cumprod[timesteps[position + 1]])
            beta = 1 - abar / abar_prev  # β_t, or the respaced β' between visited steps
            mean = (
                beta * abar_prev**0.5 / (1 - abar) * x0_hat
                + (1 - abar_prev) * (1 - beta) ** 0.5 / (1 - abar) * x
            )
            x = mean + beta**0.5 * self._draw_noise(x0, at(t), generator)
        reconstruction = (x + 1) / 2
        anomaly_map = (images.float() - reconstruction).square().mean(dim=1)
        return ScoreOutput(anomaly_map, reconstruction)
