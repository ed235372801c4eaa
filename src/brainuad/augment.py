"""Intensity augmentation of training batches, as the cDDPM code applies it.

Behrendt et al. (cDDPM, arXiv 2312.04215; patched DDPM, MIDL 2023) train DDPM, pDDPM and
cDDPM with ``aug_intensity: True`` (FinnBehrendt/Conditioned-Diffusion-Models-UAD,
``configs/experiment/cDDPM/DDPM*.yaml``), which ``src/datamodules/create_dataset.py``
(``get_augment``) turns into four torchio transforms with their default settings
(torchio 0.18.73, pinned in its ``requirements.txt``), applied in this order, each with its
own probability, to every training volume after resampling to 2 mm and before a random
slice is taken:

======================  ====  ==========================================================
transform               p     torchio 0.18.73 default
======================  ====  ==========================================================
``RandomGamma``         0.5   x ↦ sign(x)|x|^γ, γ = exp(U(−0.3, 0.3)), one γ per channel
``RandomBiasField``     0.25  x ↦ x · exp(Σ c_ijk x^i y^j z^k), i + j + k ≤ 3,
                              c ~ U(−0.5, 0.5), coordinates in [−1, 1]
``RandomBlur``          0.25  Gaussian blur, σ ~ U(0, 2) mm per axis (0–1 px at 2 mm)
``RandomGhosting``      0.5   k-space planes k ≡ 0 (mod n) along one axis × (1 − s),
                              centre plane kept; n ~ U{4, …, 10}, s ~ U(0.5, 1)
======================  ====  ==========================================================

Nothing re-masks the image afterwards in the reference (blur and ghosting put signal
outside the brain), so ``mask_outside_brain`` defaults to False.

Here the same transforms act on 2D slices ``[B, C, H, W]`` in torch, one independent draw
per slice, all random numbers from the global torch RNG (which the training loop
checkpoints), so a seeded RNG reproduces a batch exactly on any device.

Deviations (2D slices instead of 3D volumes):

- Bias field: the reference's 3D field evaluated at a slice is a 2D polynomial whose
  coefficients fold in the slice's z; here the 20 coefficients of the 3D order-3 field are
  drawn and evaluated at z ~ U(−1, 1) (the normalised position of a random slice), which
  gives the slice the same distribution of fields.
- Blur: only the two in-plane axes are blurred (no through-plane blur, which mixes slices);
  σ is in pixels (default 0–1, the reference's 0–2 mm at its 2 mm spacing); borders are
  padded by reflection (scipy's ``reflect`` keeps the edge pixel, torch's does not; the
  border is background).
- Ghosting: the axis is drawn from the two in-plane axes (as torchio itself does for 2D
  images) rather than from three. Along an in-plane axis the 3D operation restricted to a
  slice equals this 1D k-space operation exactly (the Fourier transform is separable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from brainuad.errors import InputError

Augmentation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class IntensityAugmentationSettings:
    """Probabilities and ranges; the defaults are the reference's (see the module docs).

    Attributes:
        gamma_p, log_gamma: RandomGamma probability and range of log γ.
        bias_field_p, bias_field_coefficients, bias_field_order: RandomBiasField probability,
            maximum |coefficient| and polynomial order.
        blur_p, blur_std: RandomBlur probability and range of σ in pixels.
        ghosting_p, ghosting_num_ghosts, ghosting_intensity: RandomGhosting probability,
            range of the ghost count n (inclusive integers) and of the strength s.
        mask_outside_brain: set pixels outside the brain mask to 0 afterwards (reference:
            False).
    """

    gamma_p: float = 0.5
    log_gamma: tuple[float, float] = (-0.3, 0.3)
    bias_field_p: float = 0.25
    bias_field_coefficients: float = 0.5
    bias_field_order: int = 3
    blur_p: float = 0.25
    blur_std: tuple[float, float] = (0.0, 1.0)
    ghosting_p: float = 0.5
    ghosting_num_ghosts: tuple[int, int] = (4, 10)
    ghosting_intensity: tuple[float, float] = (0.5, 1.0)
    mask_outside_brain: bool = False

    def __post_init__(self) -> None:
        for name in ("gamma_p", "bias_field_p", "blur_p", "ghosting_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"augmentation setting {name}={value}, expected 0 … 1")
        for name in ("log_gamma", "blur_std", "ghosting_num_ghosts", "ghosting_intensity"):
            low, high = getattr(self, name)
            if low > high:
                raise InputError(f"augmentation setting {name}=({low}, {high}): low > high")
        if self.blur_std[0] < 0 or self.ghosting_num_ghosts[0] < 1:
            raise InputError(
                f"augmentation settings blur_std={self.blur_std} (expected ≥ 0) and "
                f"ghosting_num_ghosts={self.ghosting_num_ghosts} (expected ≥ 1)"
            )
        if self.bias_field_order < 0:
            raise InputError(
                f"augmentation setting bias_field_order={self.bias_field_order}, expected ≥ 0"
            )


class IntensityAugmentation:
    """Callable ``(images [B, C, H, W], brainmask [B, 1, H, W]) → images``.

    Each transform is applied to each slice independently with its probability.
    """

    def __init__(self, settings: IntensityAugmentationSettings) -> None:
        self.settings = settings

    def __call__(self, images: torch.Tensor, brainmask: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or brainmask.ndim != 4 or brainmask.shape[1] != 1:
            raise ValueError(
                "augmentation expects images [B, C, H, W] and brainmask [B, 1, H, W], got "
                f"{tuple(images.shape)} and {tuple(brainmask.shape)}"
            )
        s = self.settings
        out = images.float().clone()
        steps = (
            (s.gamma_p, lambda x: random_gamma(x, s.log_gamma)),
            (
                s.bias_field_p,
                lambda x: random_bias_field(x, s.bias_field_coefficients, s.bias_field_order),
            ),
            (s.blur_p, lambda x: random_blur(x, s.blur_std)),
            (
                s.ghosting_p,
                lambda x: random_ghosting(x, s.ghosting_num_ghosts, s.ghosting_intensity),
            ),
        )
        for p, transform in steps:
            # Each slice gets each transform with probability p; only those are computed.
            chosen = torch.nonzero(_coin(out, p)).flatten()
            if chosen.numel():
                out[chosen] = transform(out[chosen])
        if s.mask_outside_brain:
            out = out * (brainmask > 0).to(out.dtype)
        return out.to(images.dtype)


def _uniform(shape: tuple[int, ...], low: float, high: float, like: torch.Tensor):
    """U(low, high) of ``shape`` from the global CPU RNG, moved to ``like``'s device."""
    return (low + (high - low) * torch.rand(shape, dtype=torch.float64)).to(like.device)


def _coin(images: torch.Tensor, p: float) -> torch.Tensor:
    """Bool ``[B]``: which slices get a transform applied with probability ``p``.

    Always draws (also when p is 0 or 1), so the coins do not depend on the settings.
    """
    return _uniform((images.shape[0],), 0.0, 1.0, images) < p


def random_gamma(images: torch.Tensor, log_gamma: tuple[float, float]) -> torch.Tensor:
    """sign(x)|x|^γ with γ = exp(U(log_gamma)) per slice and channel. ``[B, C, H, W]``."""
    b, c = images.shape[:2]
    gamma = _uniform((b, c), *log_gamma, images).exp().to(images.dtype)[..., None, None]
    return images.sign() * images.abs().pow(gamma)


def random_bias_field(images: torch.Tensor, coefficients: float, order: int) -> torch.Tensor:
    """x · exp(3D polynomial field at a random slice z), one field per slice, all channels.

    Coordinates run from −1 to 1 across the slice (pixel centres), as torchio's.
    """
    b, _, h, w = images.shape
    exponents = [
        (i, j, k)
        for i in range(order + 1)
        for j in range(order + 1 - i)
        for k in range(order + 1 - i - j)
    ]
    coeffs = _uniform((b, len(exponents)), -coefficients, coefficients, images)
    z = _uniform((b,), -1.0, 1.0, images)
    # At a fixed z the 3D polynomial is a 2D one: fold z^k into the (i, j) coefficients.
    planar = sorted({(i, j) for i, j, _ in exponents})
    folded = torch.zeros(b, len(planar), dtype=torch.float64, device=images.device)
    for n, (i, j, k) in enumerate(exponents):
        folded[:, planar.index((i, j))] += coeffs[:, n] * z**k
    yy = torch.linspace(-1.0, 1.0, h, dtype=torch.float64, device=images.device)[:, None]
    xx = torch.linspace(-1.0, 1.0, w, dtype=torch.float64, device=images.device)[None, :]
    basis = torch.stack([(xx**i * yy**j).expand(h, w) for i, j in planar])  # [P, H, W]
    field = torch.einsum("bp,phw->bhw", folded.float(), basis.float())
    return images * field.exp().to(images.dtype)[:, None]


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels ``[N, 2 radius + 1]`` for σ ``[N]`` (σ = 0: identity)."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=sigma.device)
    safe = sigma.clamp_min(1e-6)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def random_blur(images: torch.Tensor, std: tuple[float, float]) -> torch.Tensor:
    """Gaussian blur with σ_y, σ_x ~ U(std) pixels per slice (same for all its channels).

    Kernels are truncated at 4 σ, as scipy's ``gaussian_filter`` (torchio's blur).
    """
    b, c, h, w = images.shape
    sigma = _uniform((b, 2), *std, images)
    radius = max(1, int(4.0 * float(std[1]) + 0.5))
    radius = min(radius, (min(h, w) - 1))  # reflection padding needs radius < size
    flat = images.reshape(1, b * c, h, w)
    for axis in (0, 1):
        kernels = _gaussian_kernels(sigma[:, axis], radius).to(images.dtype)
        kernels = kernels.repeat_interleave(c, dim=0)  # [B·C, K]
        if axis == 0:
            weight = kernels[:, None, :, None]
            padded = F.pad(flat, (0, 0, radius, radius), mode="reflect")
        else:
            weight = kernels[:, None, None, :]
            padded = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
        flat = F.conv2d(padded, weight, groups=b * c)
    return flat.reshape(b, c, h, w)


def random_ghosting(
    images: torch.Tensor, num_ghosts: tuple[int, int], intensity: tuple[float, float]
) -> torch.Tensor:
    """MRI ghosting: along one in-plane axis per slice, scale every n-th k-space plane.

    With the spectrum centred (``fftshift``), planes 0, n, 2n, … are multiplied by
    (1 − s) and the centre plane is restored, as torchio's ``Ghosting.add_artifact``;
    the real part of the inverse transform is kept.
    """
    b, _, h, w = images.shape
    ghosts = torch.randint(num_ghosts[0], num_ghosts[1] + 1, (b,))
    axis = torch.randint(0, 2, (b,))
    strength = _uniform((b,), *intensity, images).cpu()
    out = images.clone()
    for dim, size in ((2, h), (3, w)):
        chosen = torch.nonzero(axis == dim - 2).flatten()
        if not chosen.numel():
            continue
        # The factor per plane of the centred spectrum, moved back to FFT order
        # (ifftshift) so the spectrum itself needs no shifting.
        factor = torch.ones(chosen.numel(), size)
        for row, i in enumerate(chosen.tolist()):
            factor[row, :: int(ghosts[i])] = 1.0 - float(strength[i])
            factor[row, size // 2] = 1.0
        factor = torch.fft.ifftshift(factor, dim=1)
        shape = (-1, 1, size, 1) if dim == 2 else (-1, 1, 1, size)
        factor = factor.reshape(shape).to(images.device)
        spectrum = torch.fft.fft(images[chosen].float(), dim=dim)
        out[chosen] = torch.fft.ifft(spectrum * factor, dim=dim).real.to(images.dtype)
    return out


def build_intensity_augmentation(
    settings: Mapping[str, Any] | None,
) -> Augmentation | None:
    """The training-time intensity augmentation, or None when disabled.

    Args:
        settings: None or ``{"enabled": False}``: no augmentation. Otherwise a mapping of
            :class:`IntensityAugmentationSettings` fields (missing ones take the reference's
            defaults; ``{}`` is the reference's augmentation). Ranges are 2-item lists.

    Returns:
        ``f(images [B, C, H, W] in [0, 1], brainmask [B, 1, H, W]) → images``, drawing from
        the global torch RNG.

    Raises:
        InputError: unknown setting names (the message lists the valid ones) or bad values.
    """
    if settings is None:
        return None
    settings = dict(settings)
    if not settings.pop("enabled", True):
        return None
    valid = {f.name: f for f in fields(IntensityAugmentationSettings)}
    unknown = set(settings) - set(valid)
    if unknown:
        raise InputError(
            f"augmentation: unknown settings {sorted(unknown)}, expected some of "
            f"{sorted([*valid, 'enabled'])}"
        )
    parsed: dict[str, Any] = {}
    for name, value in settings.items():
        default = getattr(IntensityAugmentationSettings, name)
        if isinstance(default, tuple):
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise InputError(f"augmentation setting {name}={value!r}, expected [low, high]")
            value = tuple(type(default[0])(v) for v in value)
        elif isinstance(default, bool):
            value = bool(value)
        else:
            value = type(default)(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"augmentation setting {name}={value!r}, expected a finite number")
        parsed[name] = value
    return IntensityAugmentation(IntensityAugmentationSettings(**parsed))


def augmentation_settings(augmentation: Augmentation | None) -> dict[str, Any] | None:
    """The resolved settings of an augmentation built here (for provenance records)."""
    if isinstance(augmentation, IntensityAugmentation):
        return asdict(augmentation.settings)
    return None


__all__ = [
    "IntensityAugmentation",
    "IntensityAugmentationSettings",
    "augmentation_settings",
    "build_intensity_augmentation",
    "random_bias_field",
    "random_blur",
    "random_gamma",
    "random_ghosting",
]
