"""Classifier-guided DDIM translation to healthy (Wolleb et al., MICCAI 2022).

Wolleb, Bieder, Sandkühler, Cattin, "Diffusion Models for Medical Anomaly Detection",
MICCAI 2022 (https://arxiv.org/abs/2203.04306). Weakly supervised: both networks learn from
healthy and lesion slices of a lesion cohort's training subjects with their slice labels
(``label`` 1: the slice has a lesion voxel; **y = 0 is healthy**).

Stage ``classifier``: a noise-aware classifier p(y | x_t, t) (the encoder half of a
diffusion UNet, 2 logits) trained with cross-entropy on x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε,
t ~ U{0, …, T−1}. Stage ``model``: a class-conditional ε-prediction UNet ε_θ(x_t, t, y)
trained with the MSE to ε (linear schedule, T = 1000) on the same slices and labels. The
model stage consumes the classifier stage, so ``model.pt`` holds both networks.

Scoring (images [0, 1] → x ∈ [−1, 1], the whole batch through one chain):

1. Deterministic DDIM encoding with y = 0 over the grid 0 = τ_0 < τ_1 < … < τ_K = L
   (``noise_level`` L, ``ddim_steps`` K): with a_0 = 1 (the image is the clean state, the
   network sees it at t = 0) and a_k = ᾱ_{τ_k},
   ``x̂0 = (x_k − √(1 − a_k) ε) / √a_k``, ``x_{k+1} = √a_{k+1} x̂0 + √(1 − a_{k+1}) ε`` with
   ε = ε_θ(x_k, τ_k, 0).
2. DDIM decoding over the same grid backwards, k = K … 1, with classifier guidance toward
   healthy: ``ε̂ = ε_θ(x_k, τ_k, 0) − √(1 − a_k) · s · ∇_x log p(y = 0 | x_k, τ_k)``, then
   the same DDIM move from a_k to a_{k−1} with ε̂ (s = ``guidance_scale``). Encode and decode
   visit exactly the same timesteps; the output at a_0 = 1 is the pseudo-healthy x̂.
3. Map = Σ over channels |x − x̂| (both in [0, 1]): ``[B, H, W]``.

With ``clip_denoised`` (the reference's default) x̂0 is clipped to [−1, 1] and ε re-derived
from it before each move, as guided-diffusion's ``ddim_sample`` / ``ddim_reverse_sample``
do; the guidance is applied to that ε and x̂0 recomputed from ε̂ without clipping
(``condition_score``).

Reference code (facts checked, no code copied): JuliaWolleb/diffusion-anomaly —
``README.md`` (flags: 128 channels, 2 residual blocks, 1 head, attention at 16, learned σ,
no scale-shift norm, linear schedule, T = 1000, lr 1e-4, batch 10; classifier width 32,
depth 4, attention at 32/16/8, attention pooling, residual up/down, scale-shift norm;
sampling ``--classifier_scale 100 --noise_level 500 --timestep_respacing ddim1000``),
``guided_diffusion/script_util.py`` (channel multipliers (1, 1, 2, 2, 4, 4) at 256 px,
attention resolutions as image_size // res, classifier num_head_channels 64, 2 classes),
``guided_diffusion/gaussian_diffusion.py`` (``ddim_reverse_sample``, ``ddim_sample``,
``condition_score2``: ε − √(1 − ᾱ_t) · s · ∇ log p), ``scripts/classifier_sample_known.py``
(class y = 0 for the UNet and the guidance; map Σ_c |x − x̂|; lesion slices only, Otsu
per slice), ``scripts/classifier_train.py`` (cross-entropy on q_sample(x, t), t uniform,
AdamW). The reference trains with EMA 0.9999 for about 80k iterations (paper, Sec. 3).
The DDIMwithCG re-implementation (moritzandres/DDIMwithCG, ``model/ddim.py``) uses MONAI's
``DiffusionModelEncoder`` as the classifier and steps one timestep at a time (L = 200,
s = 3 at 64²).

Deviations from the reference:
- MONAI ``DiffusionModelUNet`` / ``DiffusionModelEncoder`` instead of the OpenAI UNets:
  fixed (not learned) variance — irrelevant to deterministic DDIM, which uses ε only;
  additive time embedding without scale-shift norm in the classifier; the classifier head
  is MONAI's flatten → 512 → 2 MLP (dropout 0.1) instead of attention pooling, so the
  classifier is built for one ``image_size``.
- Encoding and decoding pair their timesteps exactly: the reference encodes to ᾱ_L but
  starts decoding at ᾱ_{L−2} (an off-by-two), not copied; the image is treated as the
  clean state (a_0 = 1) at both ends of the chain.
- ``ddim_steps`` makes the DDIM grid a setting (reference: 500 steps of 1 to L = 500);
  the CPU configs use a handful of steps.
- The training length is a setting. The UNet's EMA (decay 0.9999, the reference's
  ``--ema_rate``) is what scores, as the reference samples with its EMA checkpoint; the
  CPU configs lower the decay to suit their few hundred steps; the classifier has no EMA
  (as ``classifier_train.py``).
- The reference evaluates lesion slices only and thresholds each with Otsu; here every
  slice is scored and the study's calibration applies.
- Images are mapped from [0, 1] to [−1, 1] for the networks (the reference feeds its [0, 1]
  data to a model whose x̂0 it clips to [−1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from monai.networks.schedulers import DDPMScheduler

from brainuad.errors import InputError
from brainuad.methods.base import FINAL_STAGE, Method, ScoreOutput, Stage, check_choice
from brainuad.methods.diffusion_unet import build_diffusion_unet, check_levels
from brainuad.methods.registry import register
from brainuad.training.ema import EMAWeights

#: Class index of a healthy slice (slice label 0); the guidance target.
HEALTHY = 0
#: Class index of a slice with a lesion voxel (slice label 1).
LESION = 1
CLASSIFIER_STAGE = "classifier"


def ddim_grid(noise_level: int, steps: int) -> list[int]:
    """The DDIM timesteps 0 = τ_0 < … < τ_K = ``noise_level`` of ``steps`` = K even steps."""
    if not 1 <= steps <= noise_level:
        raise InputError(
            f"hyperparameter ddim_steps={steps}, expected 1 … noise_level ({noise_level})"
        )
    return [round(k * noise_level / steps) for k in range(steps + 1)]


@register("wolleb")
class Wolleb(Method):
    """Class-conditional DDPM + noise-aware classifier; DDIM encode, guided decode to healthy.

    Args:
        in_channels: number of MRI sequences C (paper: 4).
        image_size: slice size H = W the classifier is built for (paper: 256).
        channels: UNet feature channels per level (paper: 128 × (1, 1, 2, 2, 4, 4)).
        attention_levels: self-attention per UNet level (paper: at 16² of 256², level 4).
        num_res_blocks: UNet residual blocks per level (paper: 2).
        num_heads: attention heads of the UNet (paper: 1).
        norm_num_groups: GroupNorm groups of the UNet; must divide every ``channels``.
        classifier_channels: classifier channels per level (paper: 32 × (1, 1, 2, 2, 4, 4)).
        classifier_attention_levels: classifier attention per level (paper: at 32², 16², 8²
            of 256², levels 3–5).
        classifier_num_res_blocks: classifier residual blocks per level (paper depth: 4).
        classifier_num_head_channels: channels per classifier attention head (paper: 64).
        classifier_norm_num_groups: GroupNorm groups of the classifier.
        num_train_timesteps: T (paper: 1000), linear β schedule 1e-4 … 0.02.
        noise_level: L, the timestep index the DDIM encoding reaches (paper: 500).
        ddim_steps: K, DDIM steps from 0 to L, the same for encoding and decoding
            (reference: 500, one per timestep); 2K UNet and K classifier-gradient
            evaluations per slice.
        guidance_scale: s, the classifier-gradient scale (paper: 100).
        clip_denoised: clip x̂0 to [−1, 1] in each DDIM move (reference: True).
        optimizer: ``"adamw"`` (reference) or ``"adam"``; weight_decay: its weight decay
            (reference: 0).
        ema_decay: decay of the UNet's EMA weights, which score (reference: 0.9999); None
            scores with the trained UNet itself.

        ``noise_level``, ``ddim_steps``, ``guidance_scale`` and ``clip_denoised`` only affect
        scoring (``scoring_hparams``).

    Input ``[B, C, H, W]`` in [0, 1], H = W = ``image_size``, divisible by
    2^(len(channels) − 1) and by 2^len(classifier_channels) (MONAI's encoder downsamples
    after every level, the reference's after all but the last).
    """

    supervision = "image_labels"
    stages = (
        Stage(CLASSIFIER_STAGE, modules=("classifier",)),
        Stage(FINAL_STAGE, consumes=(CLASSIFIER_STAGE,), modules=("unet",)),
    )
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 10
    scoring_hparams = frozenset({"noise_level", "ddim_steps", "guidance_scale", "clip_denoised"})

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 256,
        channels: Sequence[int] = (128, 128, 256, 256, 512, 512),
        attention_levels: Sequence[bool] = (False, False, False, False, True, False),
        num_res_blocks: int = 2,
        num_heads: int = 1,
        norm_num_groups: int = 32,
        classifier_channels: Sequence[int] = (32, 32, 64, 64, 128, 128),
        classifier_attention_levels: Sequence[bool] = (False, False, False, True, True, True),
        classifier_num_res_blocks: int = 4,
        classifier_num_head_channels: int = 64,
        classifier_norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        noise_level: int = 500,
        ddim_steps: int = 500,
        guidance_scale: float = 100.0,
        clip_denoised: bool = True,
        optimizer: Literal["adam", "adamw"] = "adamw",
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.9999,
    ) -> None:
        super().__init__(
            in_channels=int(in_channels),
            image_size=int(image_size),
            channels=tuple(int(c) for c in channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=int(num_res_blocks),
            num_heads=int(num_heads),
            norm_num_groups=int(norm_num_groups),
            classifier_channels=tuple(int(c) for c in classifier_channels),
            classifier_attention_levels=tuple(bool(a) for a in classifier_attention_levels),
            classifier_num_res_blocks=int(classifier_num_res_blocks),
            classifier_num_head_channels=int(classifier_num_head_channels),
            classifier_norm_num_groups=int(classifier_norm_num_groups),
            num_train_timesteps=int(num_train_timesteps),
            noise_level=int(noise_level),
            ddim_steps=int(ddim_steps),
            guidance_scale=float(guidance_scale),
            clip_denoised=bool(clip_denoised),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
            ema_decay=None if ema_decay is None else float(ema_decay),
        )
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        check_levels(
            "classifier_attention_levels", classifier_attention_levels, classifier_channels
        )
        for name, factor in (
            ("channels", 2 ** (len(channels) - 1)),
            # MONAI's encoder downsamples after every level, by average pooling.
            ("classifier_channels", 2 ** len(classifier_channels)),
        ):
            if image_size % factor:
                raise InputError(
                    f"hyperparameter image_size={image_size} must be divisible by {factor} "
                    f"(the downsampling of {name})"
                )
        if num_heads < 1 or any(c % num_heads for c in channels):
            raise InputError(
                f"hyperparameter num_heads={num_heads} must divide every entry of channels "
                f"{tuple(channels)}"
            )
        if not 1 <= noise_level < num_train_timesteps:
            raise InputError(
                f"hyperparameter noise_level={noise_level}, expected 1 … "
                f"num_train_timesteps − 1 ({num_train_timesteps - 1})"
            )
        ddim_grid(int(noise_level), int(ddim_steps))  # validates ddim_steps
        if guidance_scale < 0:
            raise InputError(f"hyperparameter guidance_scale={guidance_scale}, expected ≥ 0")
        self.unet = build_diffusion_unet(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=tuple(c // num_heads for c in channels),
            norm_num_groups=norm_num_groups,
            num_class_embeds=2,
        )
        # The weights that score (a frozen submodule: saved, checkpointed and resumed).
        self.ema = None if ema_decay is None else EMAWeights(self.unet, decay=ema_decay)
        self.classifier = DiffusionModelEncoder(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=2,
            input_shape=(image_size, image_size),
            channels=tuple(classifier_channels),
            attention_levels=tuple(classifier_attention_levels),
            num_res_blocks=classifier_num_res_blocks,
            num_head_channels=classifier_num_head_channels,
            norm_num_groups=classifier_norm_num_groups,
            resblock_updown=True,
        )
        # Schedule constants only (nothing to save); DDIM is done by hand below so that
        # encoding and decoding share one timestep grid.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule="linear_beta"
        )

    # -- training --------------------------------------------------------------------------

    def _noised(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(x_t, t, ε, slice labels) for a batch: x0 ∈ [−1, 1], t ~ U{0 … T−1}."""
        x0 = batch["image"].float() * 2 - 1
        t = torch.randint(0, self.hparams["num_train_timesteps"], (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return self.scheduler.add_noise(x0, noise, t), t, noise, batch["label"].long()

    def stage_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        noisy, t, noise, labels = self._noised(batch)
        if stage == CLASSIFIER_STAGE:
            return F.cross_entropy(self.classifier(noisy, t).float(), labels)
        if stage == FINAL_STAGE:
            predicted = self.unet(noisy, t, class_labels=labels)
            return F.mse_loss(predicted.float(), noise)
        raise InputError(f"method {self.name!r}: no loss for stage {stage!r}")

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.stage_loss(FINAL_STAGE, batch)

    def after_optimizer_step(self, stage: str = FINAL_STAGE) -> None:
        if stage == FINAL_STAGE and self.ema is not None:
            self.ema.update(self.unet)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet that scores: its EMA copy when ``ema_decay`` is set, else itself."""
        return self.unet if self.ema is None else self.ema.module

    # -- scoring ---------------------------------------------------------------------------

    def healthy_log_prob_gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇_x log p(y = healthy | x_t = x, t) ``[B, C, H, W]`` (autograd, also under no_grad)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, t).float(), dim=-1)
            (gradient,) = torch.autograd.grad(log_probs[:, HEALTHY].sum(), x_in)
        return gradient

    def _alpha(self, timestep: int, position: int) -> float:
        """a_k of grid position k: 1 for the clean image (k = 0), ᾱ_τ otherwise."""
        return 1.0 if position == 0 else float(self.scheduler.alphas_cumprod[timestep])

    def _clip_epsilon(self, x: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
        """ε re-derived from the x̂0 it implies clipped to [−1, 1] (when ``clip_denoised``)."""
        if not self.hparams["clip_denoised"] or alpha >= 1.0:
            return eps
        x0 = ((x - (1 - alpha) ** 0.5 * eps) / alpha**0.5).clamp(-1, 1)
        return (x - alpha**0.5 * x0) / (1 - alpha) ** 0.5

    @staticmethod
    def _ddim_move(
        x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_to: float
    ) -> torch.Tensor:
        """Deterministic DDIM move from noise level ``alpha`` to ``alpha_to`` with ε."""
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """DDIM encoding of x ∈ [−1, 1] ``[B, C, H, W]`` to level L with y = healthy."""
        grid = ddim_grid(self.hparams["noise_level"], self.hparams["ddim_steps"])
        healthy = torch.full((x.shape[0],), HEALTHY, device=x.device, dtype=torch.long)
        for k in range(len(grid) - 1):
            t = torch.full_like(healthy, grid[k])
            alpha, alpha_next = self._alpha(grid[k], k), self._alpha(grid[k + 1], k + 1)
            eps = self._clip_epsilon(x, self.denoiser(x, t, class_labels=healthy).float(), alpha)
            x = self._ddim_move(x, eps, alpha, alpha_next)
        return x

    def decode(self, x: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """DDIM decoding from level L to the clean image, guided toward healthy by the
        classifier with scale ``guidance_scale`` (0: unguided)."""
        grid = ddim_grid(self.hparams["noise_level"], self.hparams["ddim_steps"])
        healthy = torch.full((x.shape[0],), HEALTHY, device=x.device, dtype=torch.long)
        for k in range(len(grid) - 1, 0, -1):
            t = torch.full_like(healthy, grid[k])
            alpha, alpha_prev = self._alpha(grid[k], k), self._alpha(grid[k - 1], k - 1)
            eps = self._clip_epsilon(x, self.denoiser(x, t, class_labels=healthy).float(), alpha)
            if guidance_scale:
                gradient = self.healthy_log_prob_gradient(x, t)
                eps = eps - (1 - alpha) ** 0.5 * guidance_scale * gradient
            x = self._ddim_move(x, eps, alpha, alpha_prev)
        return x

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        x = images.float() * 2 - 1
        translated = self.decode(self.encode(x), self.hparams["guidance_scale"])
        reconstruction = (translated + 1) / 2
        anomaly_map = (images.float() - reconstruction).abs().sum(dim=1)
        return ScoreOutput(anomaly_map, reconstruction)
