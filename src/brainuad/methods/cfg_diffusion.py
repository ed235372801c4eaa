"""Classifier-free guided diffusion: the model AnoFPDM and DDIB share, and their DDIM helpers.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), as AnoFPDM uses it
(Che et al., arXiv 2404.15683, Sec. 3; reference SoloChe/AnoFPDM).

Model: an ε-predicting UNet conditioned on the slice label y ∈ {0 = healthy, 1 = lesion} or
on the null label ∅. The label's embedding is added to the time embedding (MONAI
``DiffusionModelUNet(num_class_embeds=3)``); index 2 is ∅, a ``padding_idx`` row of the
embedding table, so its embedding is the zero vector and is never trained: "null = zero
embedding" as in the reference (``guided_diffusion/unet_v2.py``, ``null=True``). In training
the label is replaced by ∅ with probability ``label_dropout`` (0.1, ``--threshold 0.1`` in
``config/run_train_brats_clf_free_guided.sh``); loss ‖ε − ε_θ(x_t, t, y)‖² on x0 ∈ [−1, 1].

Guidance: ε̃ = (1 + w) ε_θ(x_t, t, y = 0) − w ε_θ(x_t, t, ∅) (:func:`guided_epsilon`); w = 0 is
the healthy conditional prediction itself.

DDIM (deterministic, η = 0) on one grid of timesteps 0, s, 2s, … with stride
s = T // ``num_inference_steps``: an encoding step t → t + s (``DDIMScheduler.reversed_step``
with ε at t) and a decoding step t + s → t (``DDIMScheduler.step`` with ε at t + s) are each
other's inverse up to the DDIM approximation ε(x_t, t) ≈ ε(x_{t+s}, t + s), and the encoder's
and decoder's timesteps pair exactly (no off-by-one). The chain starts from the data itself:
x at timestep 0. x̂0 estimates are clipped to [−1, 1] (``clip_sample``, the reference's
``clip_denoised=True``).

Shapes: images ``[B, C, H, W]`` in [0, 1], mapped to [−1, 1] (``x * 2 − 1``) for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler

from brainuad.errors import InputError
from brainuad.methods.base import FINAL_STAGE, Method, check_choice
from brainuad.methods.diffusion_unet import build_diffusion_unet
from brainuad.training.ema import EMAWeights

HEALTHY = 0
LESION = 1
NULL = 2  # the null label ∅: a zero, untrained embedding row


def guided_epsilon(eps_cond: torch.Tensor, eps_null: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guided noise ε̃ = (1 + w) ε(y) − w ε(∅) (AnoFPDM's w; w = 0: ε(y))."""
    if w == 0:
        return eps_cond
    return (1.0 + w) * eps_cond - w * eps_null


def median_filter_2d(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Median over ``kernel`` × ``kernel`` windows of ``[B, H, W]`` maps, reflect-padded (as the
    reference's ``median_pool``); ``kernel`` ≤ 1 returns the maps unchanged."""
    if kernel <= 1:
        return maps
    pad = kernel // 2
    padded = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    windows = padded.unfold(2, kernel, 1).unfold(3, kernel, 1)
    return windows.reshape(*windows.shape[:4], -1).median(dim=-1).values[:, 0]


def check_map_settings(
    map_channels: Sequence[int] | None, median_kernel: int, in_channels: int
) -> None:
    """Refuse map channels that are not indices of the ``in_channels`` inputs, and a median
    kernel that is not odd and positive (InputError naming the hyperparameter)."""
    if map_channels is not None and (
        not map_channels or any(not 0 <= int(c) < in_channels for c in map_channels)
    ):
        raise InputError(
            f"hyperparameter map_channels={list(map_channels)}, expected indices of the "
            f"{in_channels} input channel(s)"
        )
    if median_kernel < 1 or median_kernel % 2 == 0:
        raise InputError(f"hyperparameter median_kernel={median_kernel}, expected odd ≥ 1")


def add_resblock_dropout(unet: torch.nn.Module, p: float) -> None:
    """Dropout before the second convolution of every residual block, where ADM has it
    (``guided_diffusion/unet_v2.py`` ``ResBlock.out_layers``); MONAI's blocks have none."""
    if p <= 0:
        return
    for module in unet.modules():
        if type(module).__name__ == "DiffusionUNetResnetBlock":
            module.conv2 = torch.nn.Sequential(torch.nn.Dropout(p), module.conv2)


class ClassifierFreeDiffusion(Method):
    """Shared part of AnoFPDM and DDIB: the classifier-free guided UNet, its training loss,
    and DDIM on a strided grid. Not registered; subclasses add the scoring.

    Args (the shared hyperparameters; subclasses document their own):
        in_channels: number of input sequences.
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups,
            resblock_updown: the MONAI ``DiffusionModelUNet``. Defaults: the reference's ADM
            at 128² (``guided_diffusion/script_util.py``: 128 channels, multipliers
            (1, 1, 2, 3, 4), 2 residual blocks, 4 heads, attention at 32/16/8 px, i.e. levels
            3–5; ``--attention_resolutions 32,16,8``).
        dropout: dropout in the residual blocks (0.1, ``--dropout 0.1``).
        label_dropout: probability of training on ∅ instead of the label (0.1).
        num_train_timesteps: T (1000, linear β schedule 1e-4…0.02, ε-prediction).
        num_inference_steps: size n of the DDIM grid over T (stride T // n; n = T walks every
            timestep, as the reference).
        score_seed: unused by the deterministic scoring; kept for the contract.
        optimizer, weight_decay: AdamW with weight decay 0 (``--weight_decay 0``).
        ema_decay: decay of the EMA weights that score (``--ema_rate 0.9999``; the
            reference's translation scripts load the EMA checkpoint, ``--ema True`` in
            ``config/run_translation_*_{fpdm,ddib}.sh``); None scores with the trained UNet.
    """

    supervision = "image_labels"
    default_learning_rate = 1e-4
    default_batch_size = 64

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
        score_seed: int = 0,
        optimizer: Literal["adam", "adamw"] = "adamw",
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.9999,
        **method_hparams: Any,
    ) -> None:
        head_channels: int | tuple[int, ...] = (
            int(num_head_channels)
            if isinstance(num_head_channels, int)
            else tuple(int(c) for c in num_head_channels)
        )
        super().__init__(
            in_channels=int(in_channels),
            channels=tuple(int(c) for c in channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=int(num_res_blocks),
            num_head_channels=head_channels,
            norm_num_groups=int(norm_num_groups),
            resblock_updown=bool(resblock_updown),
            dropout=float(dropout),
            label_dropout=float(label_dropout),
            num_train_timesteps=int(num_train_timesteps),
            num_inference_steps=int(num_inference_steps),
            score_seed=int(score_seed),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
            ema_decay=None if ema_decay is None else float(ema_decay),
            **method_hparams,
        )
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        if not 0.0 <= label_dropout < 1.0:
            raise InputError(f"hyperparameter label_dropout={label_dropout}, expected [0, 1)")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"hyperparameter dropout={dropout}, expected [0, 1)")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise InputError(
                f"hyperparameter num_inference_steps={num_inference_steps}, expected 1 … "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        self.unet = build_diffusion_unet(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            num_class_embeds=3,
        )
        # ∅ = the zero vector, never trained (the reference's null embedding).
        time_dim = self.unet.class_embedding.embedding_dim
        self.unet.class_embedding = torch.nn.Embedding(3, time_dim, padding_idx=NULL)
        add_resblock_dropout(self.unet, dropout)
        # The weights that score (a frozen submodule: saved, checkpointed and resumed).
        self.ema = None if ema_decay is None else EMAWeights(self.unet, decay=ema_decay)
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule="linear_beta",
            clip_sample=True,
            prediction_type="epsilon",
        )
        self.scheduler.set_timesteps(num_inference_steps)

    @property
    def stride(self) -> int:
        """Timesteps between two points of the DDIM grid (MONAI's T // n)."""
        return self.scheduler.num_train_timesteps // self.scheduler.num_inference_steps

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """ε_θ ``[B, C, H, W]`` of the trained UNet from x_t ``[B, C, H, W]``, t and labels
        ``[B]`` (0, 1, 2 = ∅)."""
        return self.unet(noisy, timesteps, class_labels=labels)

    def scoring_epsilon(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """ε as :meth:`forward`, of the network that scores: the EMA weights when
        ``ema_decay`` is set, else the trained UNet."""
        network = self.unet if self.ema is None else self.ema.module
        return network(noisy, timesteps, class_labels=labels)

    def after_optimizer_step(self, stage: str = FINAL_STAGE) -> None:
        if self.ema is not None:
            self.ema.update(self.unet)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"].float() * 2 - 1
        b = x0.shape[0]
        labels = batch["label"].to(x0.device).long().clamp(0, 1)
        dropped = torch.rand(b, device=x0.device) < self.hparams["label_dropout"]
        labels = torch.where(dropped, torch.full_like(labels, NULL), labels)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self(noisy, t, labels).float(), noise)

    def null_and_healthy_epsilon(
        self, sample: torch.Tensor, timestep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ε(x_t, t, ∅) and ε(x_t, t, y = 0) from ONE network call on a ``[2B, …]`` batch."""
        b = sample.shape[0]
        t = torch.full((2 * b,), timestep, device=sample.device, dtype=torch.long)
        labels = torch.cat(
            [
                torch.full((b,), NULL, device=sample.device, dtype=torch.long),
                torch.full((b,), HEALTHY, device=sample.device, dtype=torch.long),
            ]
        )
        eps = self.scoring_epsilon(torch.cat([sample, sample]), t, labels).float()
        return eps[:b], eps[b:]

    def null_epsilon(self, sample: torch.Tensor, timestep: int) -> torch.Tensor:
        """ε(x_t, t, ∅) ``[B, C, H, W]``."""
        b = sample.shape[0]
        t = torch.full((b,), timestep, device=sample.device, dtype=torch.long)
        labels = torch.full((b,), NULL, device=sample.device, dtype=torch.long)
        return self.scoring_epsilon(sample, t, labels).float()

    def predict_x0(self, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, clipped to [−1, 1] (as the scheduler's step)."""
        alpha = self.scheduler.alphas_cumprod[timestep].to(sample.device)
        x0 = (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return x0.clamp(-1.0, 1.0)

    def ddim_encode(self, x0: torch.Tensor, n_steps: int) -> torch.Tensor:
        """Deterministic DDIM inversion with ∅ from x0 (timestep 0) over ``n_steps`` grid
        steps, to timestep ``n_steps * stride``: one network evaluation per step."""
        sample = x0
        for k in range(n_steps):
            t = k * self.stride
            sample, _ = self.scheduler.reversed_step(self.null_epsilon(sample, t), t, sample)
        return sample

    def ddim_decode(self, sample: torch.Tensor, n_steps: int, w: float) -> torch.Tensor:
        """DDIM decoding from timestep ``n_steps * stride`` to 0 toward healthy with guidance
        ``w``, the exact reverse of :meth:`ddim_encode`'s grid: each step t + s → t uses ε at
        t + s. Two evaluations per step (one call) when w ≠ 0, else one."""
        for k in reversed(range(1, n_steps + 1)):
            t = k * self.stride
            if w == 0:
                b = sample.shape[0]
                labels = torch.full((b,), HEALTHY, device=sample.device, dtype=torch.long)
                ts = torch.full((b,), t, device=sample.device, dtype=torch.long)
                eps = self.scoring_epsilon(sample, ts, labels).float()
            else:
                eps_null, eps_healthy = self.null_and_healthy_epsilon(sample, t)
                eps = guided_epsilon(eps_healthy, eps_null, w)
            sample, _ = self.scheduler.step(eps, t, sample)
        return sample


__all__ = [
    "HEALTHY",
    "LESION",
    "NULL",
    "ClassifierFreeDiffusion",
    "add_resblock_dropout",
    "guided_epsilon",
    "median_filter_2d",
]
