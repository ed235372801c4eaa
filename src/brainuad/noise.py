"""Noise for diffusion models: Gaussian, and the two simplex-noise flavours of the references.

One small interface, :class:`Noise`, so a method receives its noise as a component chosen by
configuration (``build_noise("simplex")``) and uses the same object in training (global torch
RNG) and scoring (a seeded ``torch.Generator``), as diffusers' ``add_noise(x0, noise, t)``
takes the noise from the caller.

Simplex noise (Wyatt et al., "AnoDDPM", CVPR Workshops 2022) is fractal OpenSimplex noise:
``Σ_k a^k · S(x / (f / 2^k), y / (f / 2^k))`` over ``octaves`` k = 0 … K−1, persistence a,
"frequency" f (a wavelength in pixels: larger is smoother). The references use their own
numba fork of the ``opensimplex`` package; here the package itself is used (same algorithm,
same gradients and permutation set-up), with its numba-compiled array functions.

The two flavours, checked in the reference code:

- ``"simplex"`` — Behrendt et al. (patched DDPM, MIDL 2023; cDDPM, arXiv 2312.04215),
  FinnBehrendt/Conditioned-Diffusion-Models-UAD ``src/utils/generate_noise.py``
  (``gen_noise`` → ``generate_simplex_noise(..., random_param=False)`` →
  ``Simplex_CLASS.rand_2d_octaves``): a 2D pattern, independent of t, a new permutation seed
  on every call (``newSeed()``), ONE pattern repeated over the batch (and, being
  ``[B, 1, H, W]``, broadcast over channels), octaves 6, persistence 0.8, frequency 64, not
  normalised: its standard deviation is about 0.6 at 96–128 px, not 1. The reference casts
  it to float16 (``.half()``); we keep ``dtype``.
- ``"simplex_3d"`` — AnoDDPM, Julian-Wyatt/AnoDDPM ``GaussianDiffusion.py``
  (``generate_simplex_noise`` → ``simplex.py`` ``rand_3d_fixed_T_octaves``): the slice
  z = t of 3D noise, coordinates ``(x / f, y / f, t / f)`` per octave, a new seed per
  channel, that channel's pattern repeated over the batch; same octave settings, not
  normalised (std about 0.5). The reference trains with batch size 1 (``test_args/*.json``),
  so it never meets a batch of different timesteps; here each sample is the slice of its
  channel's 3D field at its own t, which equals the reference when all t are equal.

Seeds for the permutation tables are drawn from the torch generator (or the global torch RNG
when ``generator`` is None), so a seeded generator gives identical noise on every call order.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from opensimplex import OpenSimplex

from brainuad.errors import InputError

NoiseKind = Literal["gaussian", "simplex", "simplex_3d"]

# Seeds for OpenSimplex's permutation tables: any int64 works; draw from a wide range.
_SEED_HIGH = 2**62


class Noise(abc.ABC):
    """A noise source for the forward diffusion process.

    Call it with the shape ``[B, C, H, W]`` and, for time-dependent noise, the timesteps
    ``[B]``; draw from ``generator`` when given (deterministic scoring), else from the global
    torch RNG (training, whose RNG state the training loop checkpoints).
    """

    kind: ClassVar[str] = ""

    def __call__(
        self,
        shape: Sequence[int],
        timesteps: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Noise of ``shape`` ``[B, C, H, W]`` on ``device`` in ``dtype``.

        Args:
            shape: ``[B, C, H, W]``.
            timesteps: integer ``[B]``, the diffusion step of each sample (0-based); needed
                by time-dependent noise, ignored by the others.
            generator: source of randomness; None draws from the global torch RNG.
            device, dtype: of the returned tensor.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"{self.kind} noise: shape must be [B, C, H, W], got {shape}")
        return self._draw(shape, timesteps, generator, torch.device(device), dtype)

    @abc.abstractmethod
    def _draw(
        self,
        shape: tuple[int, int, int, int],
        timesteps: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]:
        """The settings that rebuild this noise with :func:`build_noise` (plus ``kind``)."""
        return {"kind": self.kind}


class GaussianNoise(Noise):
    """Standard normal noise, ``torch.randn``, independent per element."""

    kind = "gaussian"

    def _draw(self, shape, timesteps, generator, device, dtype):
        if generator is not None and generator.device != device:
            return torch.randn(shape, generator=generator, device=generator.device).to(
                device, dtype
            )
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class _FractalSimplex(Noise):
    """Shared octave sum and seeding of the two simplex flavours."""

    def __init__(
        self,
        *,
        octaves: int = 6,
        persistence: float = 0.8,
        frequency: float = 64.0,
        normalise: bool = False,
    ) -> None:
        if int(octaves) < 1:
            raise InputError(f"{self.kind} noise: octaves={octaves}, expected an integer ≥ 1")
        if not 0 < float(persistence) <= 1:
            raise InputError(f"{self.kind} noise: persistence={persistence}, expected (0, 1]")
        if float(frequency) <= 0:
            raise InputError(f"{self.kind} noise: frequency={frequency}, expected > 0")
        self.octaves = int(octaves)
        self.persistence = float(persistence)
        self.frequency = float(frequency)
        self.normalise = bool(normalise)

    def settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "octaves": self.octaves,
            "persistence": self.persistence,
            "frequency": self.frequency,
            "normalise": self.normalise,
        }

    @staticmethod
    def _seeds(n: int, generator: torch.Generator | None) -> list[int]:
        """``n`` permutation seeds from ``generator`` (or the global torch RNG)."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, _SEED_HIGH, (n,), generator=generator, device=device).tolist()

    def _octaves(self, evaluate) -> np.ndarray:
        """Σ_k persistence^k · evaluate(frequency / 2^k), as the references sum octaves."""
        total = None
        frequency, amplitude = self.frequency, 1.0
        for _ in range(self.octaves):
            layer = amplitude * evaluate(frequency)
            total = layer if total is None else total + layer
            frequency /= 2
            amplitude *= self.persistence
        return total

    def _finish(self, patterns: np.ndarray, device, dtype) -> torch.Tensor:
        """float64 patterns ``[..., H, W]`` → tensor, optionally unit variance per pattern."""
        out = torch.from_numpy(np.ascontiguousarray(patterns))
        if self.normalise:
            std = out.flatten(-2).std(dim=-1).clamp_min(1e-12)
            mean = out.flatten(-2).mean(dim=-1)
            out = (out - mean[..., None, None]) / std[..., None, None]
        return out.to(device=device, dtype=dtype)


class SimplexNoise2D(_FractalSimplex):
    """Behrendt's simplex noise: one 2D pattern per call, shared by batch and channels.

    Args:
        octaves: number of octaves (reference: 6).
        persistence: amplitude ratio between octaves (reference: 0.8).
        frequency: wavelength of the first octave in pixels (reference: 64).
        normalise: scale each pattern to zero mean, unit std (reference: False; its std is
            about 0.6 at 96–128 px).

    ``timesteps`` is ignored (the reference's noise does not depend on t).
    """

    kind = "simplex"

    def _draw(self, shape, timesteps, generator, device, dtype):
        b, c, h, w = shape
        (seed,) = self._seeds(1, generator)
        simplex = OpenSimplex(seed)
        ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
        pattern = self._octaves(lambda f: simplex.noise2array(xs / f, ys / f))  # [H, W]
        return self._finish(pattern, device, dtype).expand(b, c, h, w).contiguous()


class SimplexNoise3D(_FractalSimplex):
    """AnoDDPM's simplex noise: the slice z = t of 3D noise, one field per channel.

    Args: as :class:`SimplexNoise2D` (reference: 6, 0.8, 64, not normalised).

    ``timesteps`` ``[B]`` is required: sample b of channel c is the field of channel c (a
    new seed per channel and call) at ``z = timesteps[b]``, so equal timesteps give the
    same pattern across the batch, as in the reference.
    """

    kind = "simplex_3d"

    def _draw(self, shape, timesteps, generator, device, dtype):
        b, c, h, w = shape
        if timesteps is None:
            raise ValueError("simplex_3d noise depends on the timestep: pass timesteps [B]")
        t = timesteps.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if t.shape[0] != b:
            raise ValueError(f"simplex_3d noise: {t.shape[0]} timesteps for a batch of {b}")
        # Evaluate each distinct t once: a batch often repeats timesteps (always at scoring).
        unique_t, index = np.unique(t, return_inverse=True)
        ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
        channels = []
        for seed in self._seeds(c, generator):
            simplex = OpenSimplex(seed)
            field = self._octaves(
                lambda f, s=simplex: s.noise3array(xs / f, ys / f, unique_t / f)
            )  # [T_unique, H, W]
            channels.append(field[index])  # [B, H, W]
        return self._finish(np.stack(channels, axis=1), device, dtype)


_KINDS: dict[str, type[Noise]] = {
    "gaussian": GaussianNoise,
    "simplex": SimplexNoise2D,
    "simplex_3d": SimplexNoise3D,
}


def build_noise(kind: NoiseKind, **settings: Any) -> Noise:
    """The noise of ``kind`` with keyword ``settings``.

    Args:
        kind: ``"gaussian"`` (no settings), ``"simplex"`` (Behrendt's 2D flavour) or
            ``"simplex_3d"`` (AnoDDPM's time-dependent flavour); the simplex kinds take
            ``octaves``, ``persistence``, ``frequency`` and ``normalise``.

    Raises:
        InputError: unknown kind or setting (the message lists the valid ones).
    """
    if kind not in _KINDS:
        raise InputError(f"noise kind {kind!r}, expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    if cls is GaussianNoise:
        if settings:
            raise InputError(f"gaussian noise takes no settings, got {sorted(settings)}")
        return GaussianNoise()
    valid = {"octaves", "persistence", "frequency", "normalise"}
    unknown = set(settings) - valid
    if unknown:
        raise InputError(
            f"{kind} noise: unknown settings {sorted(unknown)}, expected some of {sorted(valid)}"
        )
    return cls(**settings)


__all__ = [
    "GaussianNoise",
    "Noise",
    "NoiseKind",
    "SimplexNoise2D",
    "SimplexNoise3D",
    "build_noise",
]
