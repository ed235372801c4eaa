"""Patched DDPM (pDDPM): a DDPM that noises and reconstructs one grid patch at a time.

Behrendt, Bhattacharya, Krüger, Opfer, Schlaefer, "Patched Diffusion Models for Unsupervised
Anomaly Detection in Brain MRI", MIDL 2023 (https://arxiv.org/abs/2303.03758), Sec. 2.

The slice is cut into a fixed grid of ``patch_size`` × ``patch_size`` patches with stride
``patch_size`` (4 patches of 48² on the paper's 96² slices; patches at the border are cut
off where the size does not divide the slice, as the reference's box slicing does).

Training (x0 ∈ [0, 1] mapped to [-1, 1]): per sample, t ~ U{0, …, T−1} and one grid patch
k ~ U chosen at random; ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` inside patch k while the
rest of the slice stays clean (x0); the UNet predicts x0 from that input; outside the patch
its prediction is replaced by x0 itself, so the L1 loss (mean over the image) comes from the
noised patch only.
Scoring: one noise draw ε for the batch; for each patch k the input is x0 with only patch k
noised to t = ``test_timestep``; all K patch inputs of all slices run as one UNet batch
``[B·K, C, H, W]``; x̂0 is stitched from the patch each pass noised (patch k of x̂0 from
pass k); anomaly map |x − x̂0| averaged over channels. No noise ensemble.

Everything else is the plain DDPM's (:class:`brainuad.methods.ddpm.DDPM`, subclassed here):
UNet, cosine schedule, T = 1000, x0 prediction, L1, Behrendt's simplex noise, t = 500.

Reference code (facts checked, no code copied): FinnBehrendt/patched-Diffusion-Models-UAD,
``configs/experiment/MIDL23_DDPM/DDPM_patched.yaml`` (patch_size 48, grid_boxes True,
inpaint True: "Loss calculation only for the patched region", test_timesteps 500, simplex
noise, 1600 epochs), ``src/models/DDPM_2D_patched.py`` (a random grid box per sample in
training; at test, one noise draw for all boxes, each box reconstructed in its own pass and
copied into the stitched image), ``src/utils/patch_sampling.py`` (``BoxSampler.sample_grid``:
x/y starts ``arange(0, size, patch_size)``, row-major), ``src/models/modules/cond_DDPM.py``
(``p_losses``: the whole image is noised, then everything outside the box is reset to x0;
with ``inpaint`` the output outside the box is set to x0 before the L1 mean over all pixels).

Deviations from the reference: those of :class:`~brainuad.methods.ddpm.DDPM` (MONAI UNet,
fp32 weights), and
- the reference runs one pass per patch in a Python loop over a whole volume; here all patches
  of all slices of a batch are one UNet batch (same maps, faster);
- ``patch_size`` is a hyperparameter, so CPU configs at 64 px use 32 (the paper's 48 at 96
  px scaled with the slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from brainuad.errors import InputError
from brainuad.methods.base import ScoreOutput, reconstruction_loss, residual_map
from brainuad.methods.ddpm import DDPM
from brainuad.methods.registry import register


def grid_patch_masks(height: int, width: int, patch_size: int) -> torch.Tensor:
    """Masks of the grid patches, bool ``[K, 1, H, W]``, row-major (K = ⌈H/p⌉ · ⌈W/p⌉).

    Patch starts are ``0, p, 2p, …`` along each axis, as the reference's grid; a border
    patch is cut off at the slice edge. The patches partition the slice: every pixel lies in
    exactly one patch.
    """
    if patch_size < 1:
        raise InputError(f"hyperparameter patch_size={patch_size}, expected ≥ 1")
    masks = []
    for top in range(0, height, patch_size):
        for left in range(0, width, patch_size):
            mask = torch.zeros(1, height, width, dtype=torch.bool)
            mask[:, top : top + patch_size, left : left + patch_size] = True
            masks.append(mask)
    return torch.stack(masks)


@register("pddpm")
class PatchedDDPM(DDPM):
    """DDPM trained and scored on one noised grid patch at a time (pDDPM, MIDL 2023).

    Args:
        patch_size: side of the grid patches and the grid's stride, in pixels (paper: 48 at
            96 px; scale it with the slice size).
        Others: as :class:`~brainuad.methods.ddpm.DDPM` (same defaults: the reference's).

    Input ``[B, C, H, W]`` in [0, 1]; H and W at least ``patch_size`` and divisible by
    2^(len(channels) − 1).
    """

    def __init__(
        self,
        *,
        patch_size: int = 48,
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
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            test_timestep=test_timestep,
            noise=noise,
            noise_settings=noise_settings,
            loss=loss,
            loss_region=loss_region,
            score_seed=score_seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
        )
        if int(patch_size) < 1:
            raise InputError(f"hyperparameter patch_size={patch_size}, expected ≥ 1")
        self.hparams["patch_size"] = int(patch_size)

    def patch_masks(self, like: torch.Tensor) -> torch.Tensor:
        """Grid patch masks for slices shaped like ``like`` ``[B, C, H, W]``: bool
        ``[K, 1, H, W]`` on its device."""
        height, width = like.shape[-2:]
        size = self.hparams["patch_size"]
        if size > height or size > width:
            raise ValueError(
                f"pddpm: patch_size {size} is larger than the {height} x {width} slices"
            )
        return grid_patch_masks(height, width, size).to(like.device)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"].float() * 2 - 1
        b = x0.shape[0]
        masks = self.patch_masks(x0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (b,), device=x0.device).long()
        chosen = masks[torch.randint(0, masks.shape[0], (b,), device=x0.device)]  # [B,1,H,W]
        noised = self.scheduler.add_noise(x0, self._draw_noise(x0, t), t)
        predicted = self(torch.where(chosen, noised, x0), t)
        # The reference's "inpaint" loss: outside the patch the output is x0 itself, so only
        # the noised patch contributes (the mean still runs over the whole image).
        return reconstruction_loss(
            torch.where(chosen, predicted, x0),
            x0,
            batch["brainmask"],
            loss=self.hparams["loss"],
            region=self.hparams["loss_region"],
        )

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        x0 = images.float() * 2 - 1
        b, c, h, w = x0.shape
        masks = self.patch_masks(x0)  # [K, 1, H, W]
        k = masks.shape[0]
        index = self.hparams["test_timestep"] - 1
        t = torch.full((b,), index, device=x0.device, dtype=torch.long)
        # One noise draw shared by all patches of a slice (the reference draws once).
        noised = self.scheduler.add_noise(x0, self._draw_noise(x0, t, generator), t)
        # [B, K, C, H, W]: pass k of slice b has only patch k noised.
        inputs = torch.where(masks[None], noised[:, None], x0[:, None])
        predicted = self(
            inputs.reshape(b * k, c, h, w),
            torch.full((b * k,), index, device=x0.device, dtype=torch.long),
        ).reshape(b, k, c, h, w)
        # Stitch: patch k of the reconstruction comes from pass k (the patches partition the
        # slice, so the masked sum picks exactly one pass per pixel).
        stitched = (predicted.float() * masks[None]).sum(dim=1)
        reconstruction = (stitched + 1) / 2
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)

    @torch.no_grad()
    def unbatched_score(self, images: torch.Tensor, brainmask: torch.Tensor) -> ScoreOutput:
        """The maps of :meth:`score` as the reference computes them: one slice and one patch
        (one UNet call) at a time, stitched; for benchmarks (``brainuad.bench.scoring``) and
        tests. Equal to ``score`` wherever a slice's noise does not depend on its batch
        (simplex noise: one pattern per call)."""
        was_training = self.training
        self.eval()
        try:
            reconstructions = []
            for i in range(images.shape[0]):
                generator = torch.Generator(device=images.device).manual_seed(self.score_seed)
                x0 = images[i : i + 1].float() * 2 - 1
                t = torch.full(
                    (1,), self.hparams["test_timestep"] - 1, device=x0.device, dtype=torch.long
                )
                noised = self.scheduler.add_noise(x0, self._draw_noise(x0, t, generator), t)
                stitched = torch.zeros_like(x0)
                for patch in self.patch_masks(x0):
                    predicted = self(torch.where(patch, noised, x0), t)
                    stitched = torch.where(patch, predicted.float(), stitched)
                reconstructions.append((stitched + 1) / 2)
        finally:
            self.train(was_training)
        reconstruction = torch.cat(reconstructions)
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)
