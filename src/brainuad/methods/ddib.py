"""DDIB: dual diffusion implicit bridges toward healthy, as AnoFPDM compares it.

Su, Song, Meng, Ermon, "Dual Diffusion Implicit Bridges for Image-to-Image Translation",
ICLR 2023 (arXiv 2203.08382); the anomaly-detection setting of Che et al., AnoFPDM
(arXiv 2404.15683, baselines), reference SoloChe/AnoFPDM (facts checked, no code copied):
``scripts/translation_DDIB.py``, ``scripts/obtain_hyperpara.py`` (``get_mask_batch``),
``scripts/sample.py``, ``config/run_translation_brats_ddib.sh`` (w = 1.1, sample_steps 450,
modality 0 3 = FLAIR, T2).

Model and training: the classifier-free guided UNet of
:class:`~brainuad.methods.cfg_diffusion.ClassifierFreeDiffusion` (the same model class as
``anofpdm``; in the study it trains as its own method).

Scoring, for x ∈ [−1, 1] ``[B, C, H, W]``: DDIM-invert x with the null label ∅ from timestep 0
to L (450 in the reference; grid steps of stride T // ``num_inference_steps``, L rounded down
to the grid), one evaluation per step; then DDIM-decode from L back to 0 on the same grid with
guidance ε̃ = (1 + w) ε(y = 0) − w ε(∅), w = 1.1, two evaluations per step in one call. The
map is the mean over the map channels (FLAIR and T2 in the reference) of (x − x̂)²,
median-filtered 5 × 5. Cost per slice: L/s + 2 L/s evaluations.

Deviations from the reference:
- Encoding and decoding timesteps pair exactly (encode t → t + s with ε at t, decode
  t + s → t with ε at t + s); the reference encodes t = 0 … 449 to ᾱ_450 and starts decoding
  at t = 449.
- The reference tunes DDIB's pixel threshold on validation pixel labels
  (``obtain_optimal_threshold``); here the study's shared calibration applies.
- EMA weights score, MONAI UNet, [0, 1] → [−1, 1] images, clipping as in
  :mod:`brainuad.methods.anofpdm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from brainuad.errors import InputError
from brainuad.methods.base import ScoreOutput
from brainuad.methods.cfg_diffusion import (
    ClassifierFreeDiffusion,
    check_map_settings,
    median_filter_2d,
)
from brainuad.methods.registry import register


@register("ddib")
class DDIB(ClassifierFreeDiffusion):
    """Classifier-free guided DDPM: DDIM-encode with ∅, decode toward healthy, map (x − x̂)².

    Args:
        guidance_scale: w of the decoding (1.1, ``config/run_translation_brats_ddib.sh``).
        encode_timestep: L, the timestep the encoding reaches (450, ``sample_steps 450``);
            rounded down to the DDIM grid (at least one step).
        map_channels: indices of the input channels the map averages (the reference: FLAIR
            and T2); default all.
        median_kernel: side of the median filter (5); 1: none.
        Shared hyperparameters: see :class:`ClassifierFreeDiffusion`.

        ``guidance_scale``, ``encode_timestep``, ``map_channels``, ``median_kernel``,
        ``num_inference_steps`` and ``score_seed`` only affect scoring.

    Input ``[B, C, H, W]`` in [0, 1], H and W divisible by 2^(len(channels) − 1).
    """

    has_reconstruction = True
    scoring_hparams = frozenset(
        {
            "guidance_scale",
            "encode_timestep",
            "map_channels",
            "median_kernel",
            "num_inference_steps",
            "score_seed",
        }
    )

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 128, 256, 384, 512),
        attention_levels: Sequence[bool] = (False, False, True, True, True),
        num_res_blocks: int = 2,
        num_head_channels: int | Sequence[int] = (32, 32, 64, 96, 128),
        norm_num_groups: int = 32,
        resblock_updown: bool = True,
        dropout: float = 0.1,
        label_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        num_inference_steps: int = 1000,
        guidance_scale: float = 1.1,
        encode_timestep: int = 450,
        map_channels: Sequence[int] | None = None,
        median_kernel: int = 5,
        score_seed: int = 0,
        optimizer: Literal["adam", "adamw"] = "adamw",
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.9999,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            dropout=dropout,
            label_dropout=label_dropout,
            num_train_timesteps=num_train_timesteps,
            num_inference_steps=num_inference_steps,
            score_seed=score_seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            guidance_scale=float(guidance_scale),
            encode_timestep=int(encode_timestep),
            map_channels=None if map_channels is None else [int(c) for c in map_channels],
            median_kernel=int(median_kernel),
        )
        if not self.stride <= encode_timestep < num_train_timesteps:
            raise InputError(
                f"hyperparameter encode_timestep={encode_timestep}, expected at least one "
                f"grid step ({self.stride}) and below num_train_timesteps ({num_train_timesteps})"
            )
        check_map_settings(map_channels, median_kernel, in_channels)

    @property
    def n_steps(self) -> int:
        """Grid steps of the encoding (and of the decoding)."""
        return self.hparams["encode_timestep"] // self.stride

    def translate(self, images: torch.Tensor) -> torch.Tensor:
        """Pseudo-healthy x̂ ``[B, C, H, W]`` in [0, 1] of slices in [0, 1]."""
        x = images.float() * 2 - 1
        latent = self.ddim_encode(x, self.n_steps)
        decoded = self.ddim_decode(latent, self.n_steps, self.hparams["guidance_scale"])
        return ((decoded + 1) / 2).clamp(0.0, 1.0)

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        reconstruction = self.translate(images)
        channels = self.hparams["map_channels"] or list(range(images.shape[1]))
        # (x − x̂)² on the model's [−1, 1] scale, as the reference.
        error = (2 * (images.float() - reconstruction))[:, channels].square().mean(dim=1)
        return ScoreOutput(median_filter_2d(error, self.hparams["median_kernel"]), reconstruction)
