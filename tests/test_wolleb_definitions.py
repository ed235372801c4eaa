"""Wolleb et al. (MICCAI 2022; JuliaWolleb/diffusion-anomaly, its run scripts): the
hyperparameters are the reference's by default, recorded as given, and reach the UNet, the
classifier, the EMA, the optimiser and the schedule; bad values are named."""

from __future__ import annotations

import pytest
import torch
from tiny_hparams import WOLLEB_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method


def test_defaults_are_the_references() -> None:
    assert build_method("wolleb").hparams == {
        "in_channels": 1,
        "image_size": 256,
        "channels": (128, 128, 256, 256, 512, 512),
        "attention_levels": (False, False, False, False, True, False),
        "num_res_blocks": 2,
        "num_heads": 1,
        "norm_num_groups": 32,
        "classifier_channels": (32, 32, 64, 64, 128, 128),
        "classifier_attention_levels": (False, False, False, True, True, True),
        "classifier_num_res_blocks": 4,
        "classifier_num_head_channels": 64,
        "classifier_norm_num_groups": 32,
        "num_train_timesteps": 1000,
        "noise_level": 500,
        "ddim_steps": 500,
        "guidance_scale": 100.0,
        "clip_denoised": True,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "ema_decay": 0.9999,
    }


def test_settings_are_recorded_and_reach_the_parts() -> None:
    settings = WOLLEB_TINY | {
        "in_channels": 2,
        "num_heads": 2,
        "num_train_timesteps": 300,
        "noise_level": 100,
        "ddim_steps": 5,
        "guidance_scale": 3.0,
        "clip_denoised": False,
        "optimizer": "adam",
        "weight_decay": 0.01,
        "ema_decay": 0.5,
    }
    method = build_method("wolleb", **settings)
    assert method.hparams == settings
    assert method.ema is not None and method.ema.decay == 0.5
    assert method.scheduler.num_train_timesteps == 300
    optimizer = method.configure_optimizer(1e-4)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    first_conv = next(m for m in method.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2
    classifier_conv = next(m for m in method.classifier.modules() if isinstance(m, torch.nn.Conv2d))
    assert classifier_conv.in_channels == 2
    logits = method.classifier(torch.rand(3, 2, 32, 32), timesteps=torch.zeros(3).long())
    assert logits.shape == (3, 2)
    assert build_method("wolleb", **WOLLEB_TINY).ema is None


def test_edges_are_allowed_and_bad_hyperparameters_named() -> None:
    t = 200
    base = WOLLEB_TINY | {"num_train_timesteps": t, "noise_level": 50, "ddim_steps": 1}
    for edge in ({"noise_level": 1}, {"noise_level": t - 1}, {"guidance_scale": 0.0}):
        build_method("wolleb", **base | edge)
    cases = [
        ({"noise_level": 0}, r"noise_level=0, expected 1 … num_train_timesteps − 1 \(199\)"),
        ({"noise_level": t}, r"noise_level=200, expected 1"),
        ({"guidance_scale": -1.0}, r"guidance_scale=-1.0, expected ≥ 0"),
        ({"num_heads": 3}, r"num_heads=3 must divide every entry of channels \(8, 16\)"),
        ({"num_heads": 0}, r"num_heads=0 must divide"),
        (
            {"image_size": 30},
            r"image_size=30 must be divisible by 4 \(the downsampling of classifier_channels\)",
        ),
        (
            {"image_size": 33},
            r"image_size=33 must be divisible by 2 \(the downsampling of channels\)",
        ),
        ({"optimizer": "sgd"}, r"\boptimizer\b"),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            build_method("wolleb", **base | extra)


def test_clipped_epsilon_and_ddim_move_by_their_formulas() -> None:
    """guided-diffusion's ``clip_denoised``: x̂0 = (x − √(1−ᾱ) ε) / √ᾱ clipped to [−1, 1], and
    ε re-derived from it, ε' = (x − √ᾱ x̂0) / √(1−ᾱ); the DDIM move from ᾱ to ᾱ' is
    √ᾱ' x̂0 + √(1−ᾱ') ε (Song et al. 2021, eq. 12 with σ = 0)."""
    method = build_method("wolleb", **WOLLEB_TINY)
    alpha = 0.36  # √ᾱ = 0.6, √(1−ᾱ) = 0.8
    x = torch.tensor([0.3, 0.9, -0.9, 0.0, 0.5], dtype=torch.float64)
    eps = torch.tensor([0.0, -0.6, 0.6, 0.5, -2.0], dtype=torch.float64)
    x0 = (x - 0.8 * eps) / 0.6  # 0.5, 2.3, -2.3, -0.667, 3.5
    clipped = x0.clamp(-1, 1)
    assert clipped.tolist() == pytest.approx([0.5, 1.0, -1.0, -2 / 3, 1.0])
    expected = (x - 0.6 * clipped) / 0.8
    torch.testing.assert_close(method._clip_epsilon(x, eps, alpha), expected)
    inside = (x0 > -1) & (x0 < 1)
    torch.testing.assert_close(method._clip_epsilon(x, eps, alpha)[inside], eps[inside])
    assert method._clip_epsilon(x, eps, 1.0) is eps  # no noise: nothing to clip
    unclipped = build_method("wolleb", **WOLLEB_TINY | {"clip_denoised": False})
    assert unclipped._clip_epsilon(x, eps, alpha) is eps
    moved = method._ddim_move(x, eps, alpha, 0.64)
    torch.testing.assert_close(moved, 0.8 * x0 + 0.6 * eps)
