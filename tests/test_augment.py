"""Intensity augmentation as the cDDPM code applies it (gamma, bias field, blur, ghosting)."""

from __future__ import annotations

import math

import pytest
import torch

from brainuad.augment import (
    IntensityAugmentationSettings,
    augmentation_settings,
    build_intensity_augmentation,
)
from brainuad.errors import InputError

OFF = {"gamma_p": 0.0, "bias_field_p": 0.0, "blur_p": 0.0, "ghosting_p": 0.0}


def brain_batch(b: int = 6, c: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc of 'brain' with texture in (0.1, 0.9), zero outside."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2) < (size * 0.35) ** 2
    texture = 0.1 + 0.8 * torch.rand(b, c, size, size, generator=generator)
    mask = disc[None, None].expand(b, 1, size, size).float()
    return texture * mask, mask


def only(name: str, **extra) -> dict:
    return {**OFF, f"{name}_p": 1.0, **extra}


def test_disabled_is_none_and_zero_probabilities_are_identity():
    assert build_intensity_augmentation(None) is None
    assert build_intensity_augmentation({"enabled": False, "gamma_p": 1.0}) is None
    images, mask = brain_batch()
    assert torch.equal(build_intensity_augmentation(OFF)(images, mask), images)


def test_defaults_are_the_reference():
    augmentation = build_intensity_augmentation({})
    settings = augmentation_settings(augmentation)
    assert settings["gamma_p"] == 0.5 and settings["log_gamma"] == (-0.3, 0.3)
    assert settings["bias_field_p"] == 0.25 and settings["bias_field_coefficients"] == 0.5
    assert settings["blur_p"] == 0.25 and settings["blur_std"] == (0.0, 1.0)
    assert settings["ghosting_p"] == 0.5 and settings["ghosting_num_ghosts"] == (4, 10)
    assert settings["mask_outside_brain"] is False


def test_deterministic_for_seeded_global_rng():
    images, mask = brain_batch()
    augmentation = build_intensity_augmentation({})
    torch.manual_seed(5)
    first = augmentation(images, mask)
    torch.manual_seed(5)
    assert torch.equal(augmentation(images, mask), first)
    assert not torch.equal(augmentation(images, mask), first)  # RNG moved on


def test_gamma_within_range_per_channel():
    images, mask = brain_batch()
    out = build_intensity_augmentation(only("gamma"))(images, mask)
    inside = mask[:, 0] > 0
    gamma = out.log() / images.log()  # x^γ: log ratio is γ wherever 0 < x < 1
    for i in range(images.shape[0]):
        for c in range(images.shape[1]):
            values = gamma[i, c][inside[i]]
            assert values.std() < 1e-4  # one γ per slice and channel
            assert math.exp(-0.3) - 1e-5 <= values.mean() <= math.exp(0.3) + 1e-5
    assert not torch.allclose(gamma[0, 0][inside[0]].mean(), gamma[0, 1][inside[0]].mean())
    assert (out[mask.expand_as(out) == 0] == 0).all()  # 0^γ = 0


def test_bias_field_is_a_smooth_cubic_shared_by_channels():
    images, mask = brain_batch(b=4)
    out = build_intensity_augmentation(only("bias_field"))(images, mask)
    inside = mask[:, 0] > 0
    log_field = (out / images.clamp_min(1e-9)).log()
    size = images.shape[-1]
    coords = torch.linspace(-1, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    basis = torch.stack(
        [xx**i * yy**j for i in range(4) for j in range(4 - i)], dim=-1
    )  # [H, W, 10]: monomials of degree ≤ 3
    for i in range(images.shape[0]):
        torch.testing.assert_close(log_field[i, 0][inside[i]], log_field[i, 1][inside[i]])
        target = log_field[i, 0][inside[i]].double()
        design = basis[inside[i]]
        solution = torch.linalg.lstsq(design, target[:, None]).solution
        residual = (design @ solution)[:, 0] - target
        assert residual.abs().max() < 1e-4  # a cubic polynomial in x, y
        assert target.std() > 1e-3  # and not a constant
        assert target.abs().max() <= 20 * 0.5  # |Σ c| ≤ 20 terms × 0.5


def test_blur_smooths_and_keeps_the_mean():
    images, mask = brain_batch()
    augmentation = build_intensity_augmentation(only("blur", blur_std=[0.8, 1.0]))
    out = augmentation(images, mask)
    variation = lambda x: x.diff(dim=-1).abs().mean()  # noqa: E731
    assert variation(out) < 0.7 * variation(images)
    torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    zero_sigma = build_intensity_augmentation(only("blur", blur_std=[0.0, 0.0]))
    torch.testing.assert_close(zero_sigma(images, mask), images)


def test_ghosting_moves_signal_outside_and_keeps_the_projection():
    images, mask = brain_batch()
    out = build_intensity_augmentation(only("ghosting"))(images, mask)
    outside = mask.expand_as(images) == 0
    assert out[outside].abs().mean() > 0.01  # ghosts appear in the background
    for i in range(images.shape[0]):
        # The k-space centre plane of the ghosting axis is restored: the projection of
        # the image along that axis is unchanged.
        keeps_rows = torch.allclose(out[i].sum(dim=1), images[i].sum(dim=1), atol=1e-4)
        keeps_cols = torch.allclose(out[i].sum(dim=2), images[i].sum(dim=2), atol=1e-4)
        assert keeps_rows or keeps_cols
    weak = build_intensity_augmentation(only("ghosting", ghosting_intensity=[0.0, 0.0]))
    torch.testing.assert_close(weak(images, mask), images, atol=1e-6, rtol=0)


def test_mask_outside_brain_setting():
    images, mask = brain_batch()
    out = build_intensity_augmentation(only("ghosting", mask_outside_brain=True))(images, mask)
    assert (out[mask.expand_as(out) == 0] == 0).all()


def test_probability_is_per_slice():
    images, mask = brain_batch(b=200, c=1, size=16)
    torch.manual_seed(0)
    out = build_intensity_augmentation({**OFF, "gamma_p": 0.5})(images, mask)
    changed = (out != images).flatten(1).any(dim=1).float().mean().item()
    assert 0.38 < changed < 0.62


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="gama_p"):
        build_intensity_augmentation({"gama_p": 0.5})
    with pytest.raises(InputError, match="blur_p"):
        build_intensity_augmentation({"blur_p": 1.5})
    with pytest.raises(InputError, match="log_gamma"):
        build_intensity_augmentation({"log_gamma": 0.3})
    with pytest.raises(InputError, match="low > high"):
        IntensityAugmentationSettings(blur_std=(2.0, 1.0))
