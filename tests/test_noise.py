"""Noise component: Gaussian and the two simplex flavours (Behrendt's 2D, AnoDDPM's 3D)."""

from __future__ import annotations

import pytest
import torch

from brainuad.errors import InputError
from brainuad.noise import (
    GaussianNoise,
    Noise,
    SimplexNoise2D,
    SimplexNoise3D,
    build_noise,
)

KINDS = ["gaussian", "simplex", "simplex_3d"]


def draw(noise: Noise, shape=(3, 2, 32, 32), t=(10, 500, 990), seed: int | None = 0):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return noise(shape, torch.tensor(t), generator=generator)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_device(kind):
    noise = build_noise(kind)
    out = noise((3, 2, 16, 24), torch.tensor([1, 2, 3]), device="cpu", dtype=torch.float64)
    assert out.shape == (3, 2, 16, 24)
    assert out.dtype == torch.float64
    assert out.device.type == "cpu"
    assert torch.isfinite(out).all()
    assert out.is_contiguous()


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_generator(kind):
    noise = build_noise(kind)
    assert torch.equal(draw(noise, seed=3), draw(noise, seed=3))
    assert not torch.equal(draw(noise, seed=3), draw(noise, seed=4))


@pytest.mark.parametrize("kind", KINDS)
def test_global_rng_without_generator(kind):
    """generator=None draws from the global torch RNG: reseeding it reproduces the noise,
    and successive calls differ (a new simplex seed every call, as in the references)."""
    noise = build_noise(kind)
    torch.manual_seed(11)
    first, second = draw(noise, seed=None), draw(noise, seed=None)
    torch.manual_seed(11)
    assert torch.equal(draw(noise, seed=None), first)
    assert not torch.equal(first, second)


def test_behrendt_simplex_one_pattern_independent_of_t():
    noise = build_noise("simplex")
    out = draw(noise, shape=(4, 2, 32, 32), t=(0, 1, 500, 999))
    # One pattern for the whole batch and every channel.
    assert torch.equal(out, out[:1, :1].expand_as(out))
    # The timestep plays no part.
    other_t = draw(noise, shape=(4, 2, 32, 32), t=(7, 7, 7, 7))
    assert torch.equal(out, other_t)
    assert torch.equal(noise((4, 2, 32, 32), generator=torch.Generator().manual_seed(0)), out)


def test_anoddpm_simplex_depends_on_t():
    noise = build_noise("simplex_3d")
    out = draw(noise, shape=(4, 2, 32, 32), t=(100, 100, 101, 900))
    # Equal timesteps: the same pattern (shared by the batch, as in AnoDDPM).
    assert torch.equal(out[0], out[1])
    # Neighbouring timesteps: close (a continuous field along z = t), but not equal.
    assert not torch.equal(out[0], out[2])
    assert (out[0] - out[2]).abs().mean() < 0.5 * (out[0] - out[3]).abs().mean()
    # Each channel has its own field.
    assert not torch.equal(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match="timesteps"):
        noise((2, 1, 8, 8))
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        noise((2, 1, 8, 8), torch.tensor([1, 2, 3]))


# Values of the references' own code (Conditioned-Diffusion-Models-UAD
# src/utils/generate_noise.py, Simplex_CLASS with newSeed(seed)) at 96 × 96, octaves 6,
# persistence 0.8, frequency 64; read at pixels (row, column).
PIXELS = [(0, 0), (10, 20), (95, 50), (40, 90)]
REFERENCE_2D_SEED_12345 = [0.0, -1.6073883267444864, -0.5557169943145519, -1.0040018711505316]
REFERENCE_3D_SEED_777_T100 = [
    -0.2009648784415575,
    -0.4704442149643441,
    -0.9659017967654734,
    0.15236754952118206,
]


def test_matches_reference_values(monkeypatch):
    monkeypatch.setattr(SimplexNoise2D, "_seeds", staticmethod(lambda n, generator: [12345]))
    out = build_noise("simplex")((1, 1, 96, 96), dtype=torch.float64)
    got = [out[0, 0, i, j].item() for i, j in PIXELS]
    assert got == pytest.approx(REFERENCE_2D_SEED_12345, abs=1e-12)

    monkeypatch.setattr(SimplexNoise3D, "_seeds", staticmethod(lambda n, generator: [777] * n))
    out = build_noise("simplex_3d")((1, 1, 96, 96), torch.tensor([100]), dtype=torch.float64)
    got = [out[0, 0, i, j].item() for i, j in PIXELS]
    assert got == pytest.approx(REFERENCE_3D_SEED_777_T100, abs=1e-12)


@pytest.mark.parametrize(
    "kind, size, low, high",
    [
        # Behrendt's 2D noise: std about 0.55 (96 px) to 0.59 (256 px), not 1.
        ("simplex", 96, 0.45, 0.65),
        ("simplex", 128, 0.47, 0.67),
        # AnoDDPM's 3D slice: std about 0.45–0.5.
        ("simplex_3d", 96, 0.36, 0.56),
        ("gaussian", 96, 0.97, 1.03),
    ],
)
def test_statistics(kind, size, low, high):
    noise = build_noise(kind)
    generator = torch.Generator().manual_seed(0)
    stds = [
        noise((1, 1, size, size), torch.tensor([37 * i]), generator=generator).std().item()
        for i in range(30)
    ]
    mean_std = sum(stds) / len(stds)
    assert low < mean_std < high


def test_normalise_setting():
    noise = build_noise("simplex", normalise=True)
    out = draw(noise, shape=(2, 1, 64, 64))
    assert out[0, 0].std().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0].mean().item() == pytest.approx(0.0, abs=1e-5)
    # Smaller wavelength: rougher noise (larger mean difference between neighbours).
    smooth = build_noise("simplex", frequency=64, normalise=True)((1, 1, 64, 64))
    rough = build_noise("simplex", frequency=4, normalise=True)((1, 1, 64, 64))
    assert (rough.diff(dim=-1).abs().mean()) > 3 * (smooth.diff(dim=-1).abs().mean())


def test_build_noise_errors():
    assert isinstance(build_noise("gaussian"), GaussianNoise)
    assert build_noise("simplex", octaves=3).settings() == {
        "kind": "simplex",
        "octaves": 3,
        "persistence": 0.8,
        "frequency": 64.0,
        "normalise": False,
    }
    with pytest.raises(InputError, match="simplex_3d"):
        build_noise("perlin")
    with pytest.raises(InputError, match="octave"):
        build_noise("simplex", octave=6)
    with pytest.raises(InputError, match="persistence"):
        build_noise("simplex_3d", persistence=1.5)
    with pytest.raises(InputError, match="no settings"):
        build_noise("gaussian", octaves=2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        build_noise("gaussian")((4, 4))
