"""AutoDDPM: mask, stitch and re-sample with a Gaussian DDPM (Bercea et al., 2023).

Bercea, Neumayr, Rueckert, Schnabel, "Mask, Stitch, and Re-Sample: Enhancing Robustness and
Generalizability in Anomaly Detection through Automatic Diffusion Models", ICML 2023
workshop on Interpretable Machine Learning in Healthcare (https://arxiv.org/abs/2305.19643).

Training (a plain DDPM): x0 ∈ [0, 1] as it is (the reference does not map to [-1, 1]);
t ~ U{0, …, T−1}; ε ~ N(0, I); ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` (linear β from 1e-4
to 0.02, T = 1000); the UNet predicts ε; loss MSE(ε̂, ε) over the image.

Scoring, for a batch x ``[B, C, H, W]`` (every step over the whole batch):

1. noise x to ``recon_timestep`` (scheduler index, 200) and run the ancestral DDPM chain to
   0 (``DDPMScheduler.step``, x̂0 clipped to [-1, 1] inside each step); x̂ = clamp(·, 0, 1);
2. r = |x − x̂| (mean over channels, ``[B, H, W]``) divided by its per-image
   ``residual_percentile``-th percentile (95) and clipped to [0, 1];
3. combined map m = r × spatial LPIPS(x, x̂) (SqueezeNet) when ``lpips_weights`` names the
   LPIPS weight file; m = r alone when it is None (recorded in the hyperparameters, so in
   every model and scores file);
4. mask M = (m > threshold), dilated once with a 3 × 3 kernel; threshold = ``mask_threshold``
   or, when that is None, the per-image ``mask_percentile``-th percentile of m clipped to
   [0, 1] (the reference code's default);
5. stitched s = (1 − M) x + M x̂;
6. noise s to ``inpaint_timestep`` (50) and inpaint RePaint-style: at each step t → t' (t' =
   t − 1 at full length) and for each of ``resample_steps`` (5) resamplings, the unknown part
   is one DDPM step of the current sample, the known part is x noised to t'; their union
   M·unknown + (1 − M)·known is taken back to t by q(x_t | x_t') = N(sqrt(ᾱ_t/ᾱ_t') x_t',
   (1 − ᾱ_t/ᾱ_t') I) between resamplings; after the last step the known part is x itself;
7. final map |x − x_inpainted| (mean over channels) × m (the continuous map of step 3).

The reconstruction returned is x_inpainted clamped to [0, 1]. UNet evaluations per slice:
``recon_timestep / stride + 1`` + ``resample_steps × inpaint_timestep / stride``, with
stride = ``num_train_timesteps / inference_steps`` (paper: 201 + 250 = 451). A shorter chain
(``inference_steps`` < T, for CPU runs) keeps the noise levels of the full one: the chain
visits every stride-th timestep and steps with the DDPM posterior between them (the
"respacing" of improved-diffusion: β'_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_k−1}), the UNet seeing the
original timesteps.

Reference code (facts checked, no code copied): ci-ber/autoDDPM,
``projects/autoddpm/autoddpm.yaml`` (UNet channels (128, 256, 256), attention
(False, True, True), 1 residual block, 256 head channels; noise_level_recon 200,
noise_level_inpaint 50, resample_steps 5, masking_threshold 0.13, ε-prediction, Gaussian
noise, 128², batch 16, Adam lr 1e-4, L2, 3000 epochs), ``model_zoo/ddpm.py``
(``get_autoDDPM_anomaly``: steps 1–7 above, 95th-percentile normalisation, LPIPS
``net='squeeze', spatial=True``, ``cv2.dilate`` with a 3 × 3 kernel once, inpainting from
x̂ noised to 50, known region at t − 1), ``net_utils/scheduler.py`` (linear β 1e-4 … 0.02,
``clip_sample=True``), ``net_utils/schedulers/ddpm.py`` (fixed-small variance, chain
``noise_level, …, 0``), ``data/loaders/ixi_loader.py`` (intensities in [0, 1]).

Deviations from the reference:
- MONAI ``DiffusionModelUNet`` and ``DDPMScheduler`` (the reference forks an older MONAI
  generative UNet: same layout); no AMP on CPU.
- The mask threshold: the reference's fixed 0.13 (tuned on its data, with LPIPS) crashes
  as shipped (it indexes a float); only its per-image 95th-percentile path runs, and that
  is the default here (``mask_threshold: None``). A fixed threshold is a hyperparameter;
  :func:`calibrate_mask_threshold` computes one from healthy slices (never lesion data).
- LPIPS: used only when ``lpips_weights`` is set, through the ``lpips`` package, which
  needs torchvision (it cannot be imported on this project's CPU environment). Scaling:
  ``lpips_scaling="standard"`` feeds LPIPS its documented [-1, 1] input (2x − 1); the
  reference passes 2x − 1 together with ``normalize=True``, so its network sees 4x − 3
  (``lpips_scaling="reference"`` reproduces that). Several channels: LPIPS per channel,
  averaged.
- Inpainting starts from the stitched image noised to t = 50 (as the paper describes);
  the reference code noises x̂ instead. Both agree inside the mask, and outside it the
  known region replaces the sample after the first step.
- Resampling from t' back to t uses ᾱ_t / ᾱ_t' (β_t at full length); the reference uses
  β_{t−1}, one index off.
- Several channels: residuals averaged over channels before the percentile (the
  reference has one channel).
- No geometric training augmentation (the reference's random affine and flip); the
  project's intensity augmentation is a training setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from brainuad.errors import InputError
from brainuad.methods.base import Method, ScoreOutput, check_choice, residual_map
from brainuad.methods.diffusion_unet import build_diffusion_unet
from brainuad.methods.registry import register

#: ``perceptual(x, y)`` → ``[B, H, W]`` distance map of images ``[B, C, H, W]`` in [0, 1].
PerceptualMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalised_residual(
    images: torch.Tensor, reconstruction: torch.Tensor, percentile: float
) -> torch.Tensor:
    """|x − x̂| (mean over channels) over its per-image ``percentile``-th percentile, in [0, 1].

    ``[B, C, H, W]`` × 2 → ``[B, H, W]``. An image whose percentile is 0 is divided by a
    tiny constant instead, so any residual there counts fully.
    """
    residual = residual_map(images, reconstruction)
    scale = torch.quantile(residual.flatten(1), percentile / 100.0, dim=1)
    return (residual / scale.clamp_min(1e-8)[:, None, None]).clamp(0.0, 1.0)


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """One binary dilation with a 3 × 3 square kernel: ``[B, 1, H, W]`` → same.

    Max pooling pads with -inf, so the border does not grow the mask (as ``cv2.dilate``).
    """
    return F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)


def stitch(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input outside ``mask`` ``[B, 1, H, W]`` and the reconstruction inside it."""
    return torch.where(mask > 0, reconstruction, images)


@register("autoddpm")
class AutoDDPM(Method):
    """Gaussian DDPM scored by reconstruction, masking, stitching and RePaint resampling.

    Args:
        in_channels: number of MRI sequences C.
        channels: UNet feature channels per level (reference: (128, 256, 256)).
        attention_levels: self-attention per level (reference: (False, True, True)).
        num_res_blocks: residual blocks per level (reference: 1).
        num_head_channels: channels per attention head (reference: 256).
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        num_train_timesteps: T (reference: 1000).
        beta_start, beta_end: the linear β schedule (reference: 1e-4, 0.02).
        inference_steps: timesteps the scoring chains may visit, evenly spaced from 0 with
            stride T / inference_steps (reference: 1000, every timestep); must divide T.
        recon_timestep: scheduler index the input is noised to for the reconstruction
            (reference: 200); a multiple of the stride.
        inpaint_timestep: scheduler index the stitched image is noised to for inpainting
            (reference: 50); a positive multiple of the stride.
        resample_steps: RePaint resamplings per inpainting step (reference: 5).
        residual_percentile: the per-image percentile the residual is divided by (95).
        mask_threshold: fixed threshold on the combined map, or None for the per-image
            ``mask_percentile``-th percentile (the reference code's default; its config's 0.13
            was tuned on its own data with LPIPS).
        mask_percentile: the per-image percentile used when ``mask_threshold`` is None (95).
        lpips_weights: path of the LPIPS v0.1 SqueezeNet linear-layer weights (``squeeze.pth``
            of the ``lpips`` package) to multiply the residual by spatial LPIPS, or None for
            the residual alone. Needs the ``lpips`` package (and torchvision).
        lpips_scaling: ``"standard"`` (LPIPS input 2x − 1) or ``"reference"`` (4x − 3, what
            the reference code's double scaling feeds the network).
        score_seed: seed of the scoring noise.
        optimizer: ``"adam"`` (reference) or ``"adamw"``; weight_decay: its weight decay.

        Every argument from ``inference_steps`` to ``score_seed`` only affects scoring
        (``scoring_hparams``): changing it re-scores a trained model without retraining.

    Input ``[B, C, H, W]`` in [0, 1], H and W divisible by 2^(len(channels) − 1).
    """

    supervision = "healthy"
    has_reconstruction = True
    default_learning_rate = 1e-4
    default_batch_size = 16
    scoring_hparams = frozenset(
        {
            "inference_steps",
            "recon_timestep",
            "inpaint_timestep",
            "resample_steps",
            "residual_percentile",
            "mask_threshold",
            "mask_percentile",
            "lpips_weights",
            "lpips_scaling",
            "score_seed",
        }
    )

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 256, 256),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 256,
        norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        inference_steps: int = 1000,
        recon_timestep: int = 200,
        inpaint_timestep: int = 50,
        resample_steps: int = 5,
        residual_percentile: float = 95.0,
        mask_threshold: float | None = None,
        mask_percentile: float = 95.0,
        lpips_weights: str | None = None,
        lpips_scaling: Literal["standard", "reference"] = "standard",
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
            num_train_timesteps=int(num_train_timesteps),
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            inference_steps=int(inference_steps),
            recon_timestep=int(recon_timestep),
            inpaint_timestep=int(inpaint_timestep),
            resample_steps=int(resample_steps),
            residual_percentile=float(residual_percentile),
            mask_threshold=None if mask_threshold is None else float(mask_threshold),
            mask_percentile=float(mask_percentile),
            lpips_weights=None if lpips_weights is None else str(lpips_weights),
            lpips_scaling=lpips_scaling,
            score_seed=int(score_seed),
            optimizer=optimizer,
            weight_decay=float(weight_decay),
        )
        check_choice("lpips_scaling", lpips_scaling, ("standard", "reference"))
        check_choice("optimizer", optimizer, ("adam", "adamw"))
        self.stride = _chain_stride(num_train_timesteps, inference_steps)
        _check_timestep("recon_timestep", recon_timestep, self.stride, num_train_timesteps, 0)
        _check_timestep(
            "inpaint_timestep", inpaint_timestep, self.stride, num_train_timesteps, self.stride
        )
        if resample_steps < 1:
            raise InputError(f"hyperparameter resample_steps={resample_steps}, expected ≥ 1")
        for name in ("residual_percentile", "mask_percentile"):
            if not 0 < self.hparams[name] <= 100:
                raise InputError(f"hyperparameter {name}={self.hparams[name]}, expected (0, 100]")
        if mask_threshold is not None and mask_threshold < 0:
            raise InputError(
                f"hyperparameter mask_threshold={mask_threshold}, expected ≥ 0 or null "
                "(per-image mask_percentile)"
            )
        self.unet = build_diffusion_unet(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
        )
        # Schedulers hold only constants derived from the hyperparameters (nothing to save).
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule="linear_beta",
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type="epsilon",
            clip_sample=True,
        )
        self.chain = _respaced(self.scheduler, self.stride)
        # Kept out of the module tree on purpose: LPIPS weights are not this method's trained
        # weights, so they stay out of model.pt and switching LPIPS on re-scores a trained
        # model. Tests may replace it by any PerceptualMap.
        perceptual = None if lpips_weights is None else _lpips_map(lpips_weights, lpips_scaling)
        object.__setattr__(self, "perceptual", perceptual)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted noise ``[B, C, H, W]`` from x_t ``[B, C, H, W]`` and t ``[B]``."""
        return self.unet(noisy, timesteps)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"].float()
        t = torch.randint(
            0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device
        ).long()
        noise = torch.randn_like(x0)
        predicted = self(self.scheduler.add_noise(x0, noise, t), t)
        return F.mse_loss(predicted.float(), noise)

    # -- scoring pieces (each over the whole batch) ----------------------------------------

    def _randn(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _noised(self, x0: torch.Tensor, timestep: int, generator: torch.Generator) -> torch.Tensor:
        """x0 ``[B, C, H, W]`` drawn from q(x_t | x0) at scheduler index ``timestep``."""
        t = torch.full((x0.shape[0],), timestep, device=x0.device, dtype=torch.long)
        return self.scheduler.add_noise(x0, self._randn(x0, generator), t)

    def _denoise_step(
        self, sample: torch.Tensor, timestep: int, generator: torch.Generator
    ) -> torch.Tensor:
        """One ancestral step from ``timestep`` to ``timestep − stride`` (to x̂0 from 0)."""
        t = torch.full((sample.shape[0],), timestep, device=sample.device, dtype=torch.long)
        eps = self(sample, t).float()
        previous, _ = self.chain.step(eps, timestep // self.stride, sample, generator=generator)
        return previous

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Step 1: x noised to ``recon_timestep``, chain to 0, clamped to [0, 1]."""
        start = self.hparams["recon_timestep"]
        sample = self._noised(images.float(), start, generator)
        for timestep in range(start, -1, -self.stride):
            sample = self._denoise_step(sample, timestep, generator)
        return sample.clamp(0.0, 1.0)

    def combined_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Steps 2–3: r × spatial LPIPS when configured, r alone otherwise; ``[B, H, W]``."""
        r = normalised_residual(images, reconstruction, self.hparams["residual_percentile"])
        if self.perceptual is None:
            return r
        return r * self.perceptual(images.float(), reconstruction.float())

    def anomaly_mask(self, combined: torch.Tensor) -> torch.Tensor:
        """Step 4: ``[B, H, W]`` → binary ``[B, 1, H, W]``, thresholded and dilated once."""
        threshold = self.hparams["mask_threshold"]
        if threshold is None:
            quantile = self.hparams["mask_percentile"] / 100.0
            per_image = torch.quantile(combined.flatten(1), quantile, dim=1).clamp(0.0, 1.0)
            mask = combined > per_image[:, None, None]
        else:
            mask = combined > threshold
        return dilate(mask[:, None].to(combined.dtype))

    def inpaint(
        self,
        images: torch.Tensor,
        stitched: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Step 6: RePaint from ``stitched`` noised to ``inpaint_timestep``; ``[B, C, H, W]``.

        ``mask`` ``[B, 1, H, W]`` is 1 where the image is regenerated; elsewhere the sample is
        the input noised to the level the step reaches (the input itself at the end).
        """
        images = images.float()
        known_mask = mask > 0
        alphas_cumprod = self.scheduler.alphas_cumprod.to(images.device)
        sample = self._noised(stitched.float(), self.hparams["inpaint_timestep"], generator)
        resamplings = self.hparams["resample_steps"]
        for timestep in range(self.hparams["inpaint_timestep"], 0, -self.stride):
            previous_t = timestep - self.stride
            # x_t from x_t' (t' = previous_t): q(x_t | x_t') over the skipped steps.
            forward_alpha = alphas_cumprod[timestep] / alphas_cumprod[previous_t]
            for u in range(resamplings):
                known = self._noised(images, previous_t, generator)
                unknown = self._denoise_step(sample, timestep, generator)
                previous = torch.where(known_mask, unknown, known)
                if u < resamplings - 1:
                    sample = forward_alpha.sqrt() * previous + (
                        1 - forward_alpha
                    ).sqrt() * self._randn(previous, generator)
            sample = previous
        return torch.where(known_mask, sample, images)

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        reconstruction = self.reconstruct(images, generator)
        combined = self.combined_map(images, reconstruction)
        mask = self.anomaly_mask(combined)
        stitched = stitch(images.float(), reconstruction, mask)
        inpainted = self.inpaint(images, stitched, mask, generator).clamp(0.0, 1.0)
        return ScoreOutput(residual_map(images, inpainted) * combined, inpainted)


@torch.no_grad()
def calibrate_mask_threshold(
    method: AutoDDPM,
    images: torch.Tensor,
    brainmask: torch.Tensor,
    *,
    quantile: float = 0.95,
    batch_size: int = 16,
) -> float:
    """A fixed ``mask_threshold`` from healthy slices: the ``quantile`` of their combined maps
    (steps 1–3) over brain pixels, so about 1 − ``quantile`` of healthy brain is masked.

    Give it healthy training or validation slices only (never lesion data); set the result
    as the ``mask_threshold`` hyperparameter (a scoring hyperparameter: no retraining).

    Args:
        images: float32 ``[N, C, H, W]`` in [0, 1]; brainmask: ``[N, 1, H, W]``.
    """
    if not 0 < quantile < 1:
        raise InputError(f"calibrate_mask_threshold: quantile={quantile}, expected (0, 1)")
    was_training = method.training
    method.eval()
    generator = torch.Generator(device=images.device).manual_seed(method.score_seed)
    values = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].float()
            combined = method.combined_map(batch, method.reconstruct(batch, generator))
            values.append(combined[brainmask[start : start + batch_size, 0] > 0])
    finally:
        method.train(was_training)
    pooled = torch.cat(values)
    if pooled.numel() == 0:
        raise InputError("calibrate_mask_threshold: no brain pixels in the given slices")
    # torch.quantile refuses very large inputs; a sorted index is exact for any size.
    ordered = pooled.sort().values
    return float(ordered[min(int(quantile * ordered.numel()), ordered.numel() - 1)])


def _chain_stride(num_train_timesteps: int, inference_steps: int) -> int:
    if not 1 <= inference_steps <= num_train_timesteps or num_train_timesteps % inference_steps:
        raise InputError(
            f"hyperparameter inference_steps={inference_steps}, expected a divisor of "
            f"num_train_timesteps ({num_train_timesteps})"
        )
    return num_train_timesteps // inference_steps


def _check_timestep(name: str, value: int, stride: int, total: int, minimum: int) -> None:
    if not minimum <= value < total or value % stride:
        raise InputError(
            f"hyperparameter {name}={value}, expected a multiple of the chain stride {stride} "
            f"(num_train_timesteps / inference_steps) in [{minimum}, {total - 1}]"
        )


def _respaced(scheduler: DDPMScheduler, stride: int) -> DDPMScheduler:
    """The DDPM over every ``stride``-th timestep (0, stride, 2·stride, …) with the same ᾱ,
    stepped by chain index (timestep // stride); ``scheduler`` itself when stride is 1."""
    if stride == 1:
        return scheduler
    alphas_cumprod = scheduler.alphas_cumprod[::stride].clone()
    respaced = DDPMScheduler(
        num_train_timesteps=alphas_cumprod.numel(),
        prediction_type=scheduler.prediction_type,
        clip_sample=scheduler.clip_sample,
    )
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    respaced.alphas_cumprod = alphas_cumprod
    respaced.alphas = alphas
    respaced.betas = 1.0 - alphas
    return respaced


def _lpips_map(weights: str, scaling: str) -> PerceptualMap:
    """Spatial SqueezeNet LPIPS ``[B, C, H, W]`` × 2 → ``[B, H, W]`` (per channel, averaged),
    or an InputError naming what is missing (the weight file, the ``lpips`` package)."""
    path = Path(weights)
    missing = []
    if not path.is_file():
        missing.append(f"the weight file {str(path)!r} does not exist")
    try:
        import lpips
    except Exception as error:  # ImportError, or torchvision failing to load its operators
        lpips = None
        missing.append(f"the 'lpips' package (with torchvision) cannot be imported: {error}")
    if missing:
        raise InputError(
            f"hyperparameter lpips_weights={weights!r} (SqueezeNet LPIPS v0.1 linear layers, "
            f"squeeze.pth): {'; '.join(missing)}. Set lpips_weights: null to score with the "
            "normalised residual alone."
        )
    network = lpips.LPIPS(
        pretrained=True, net="squeeze", spatial=True, model_path=str(path), verbose=False
    ).eval()

    def perceptual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        network.to(x.device)
        factor, offset = (2.0, 1.0) if scaling == "standard" else (4.0, 3.0)
        maps = [
            network(factor * x[:, c : c + 1] - offset, factor * y[:, c : c + 1] - offset)
            for c in range(x.shape[1])
        ]
        return torch.stack(maps).mean(dim=0)[:, 0].float()

    return perceptual
