"""The VAE's ELBO terms written out (Kingma & Welling 2014, reparametrisation; Gaussian
decoder of standard deviation σ = exp(rec_log_std)): z = μ + ε · exp(½ log σ²_z) with
ε ~ N(0, I), reconstruction term ‖x̂(z) − x‖² / (2σ²) summed over each slice's pixels."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import build_method


def test_elbo_terms_by_hand(monkeypatch) -> None:
    method = build_method("vae", **TINY_HPARAMS["vae"], rec_log_std=0.5)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 32, 32, generator=generator)
    mu = torch.randn(3, 8, generator=generator)
    logvar = torch.randn(3, 8, generator=generator)
    monkeypatch.setattr(method, "encode", lambda x: (mu, logvar))
    decoded = {}

    def decode(z: torch.Tensor) -> torch.Tensor:
        decoded["z"] = z
        return images * 0.5 + z.mean(dim=1)[:, None, None, None]  # depends on every sample

    monkeypatch.setattr(method, "decode", decode)
    torch.manual_seed(4)
    rec, kl = method.elbo_terms(images)
    torch.manual_seed(4)
    epsilon = torch.randn_like(mu)
    z = mu + epsilon * torch.sqrt(torch.exp(logvar))
    torch.testing.assert_close(decoded["z"], z)
    reconstruction = decode(z)
    variance = math.exp(2 * 0.5)
    expected = torch.stack(
        [((reconstruction[i] - images[i]) ** 2).sum() / (2 * variance) for i in range(3)]
    )
    assert rec.shape == (3,)
    torch.testing.assert_close(rec, expected)
    assert kl.shape == (3,)


def test_defaults_are_the_references_networks_and_settings() -> None:
    """GenAI_UAD's configs/vae.yaml (vae_hahn): widths 16-32-64-256-256, z 256, 128 px,
    LeakyReLU, no normalisation, linear output, Adam without weight decay, β = 1, σ = 1."""
    method = build_method("vae")
    assert method.hparams == {
        "in_channels": 1,
        "image_size": 128,
        "channels": (16, 32, 64, 256, 256),
        "latent_size": 256,
        "kl_weight": 1.0,
        "rec_log_std": 0.0,
        "act": "LEAKYRELU",
        "norm": None,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    modules = list(method.network.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in modules)
    norms = (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.GroupNorm)
    assert not any(isinstance(m, norms) for m in modules)
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in modules)
    assert method.network.mu.out_features == 256
    optimizer = method.configure_optimizer(1e-4)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


def test_decoder_output_is_linear_not_squashed() -> None:
    """No sigmoid anywhere: with a large latent the decoder leaves [0, 1] (a sigmoid output,
    which the reference does not have, would stay inside)."""
    method = build_method("vae", **TINY_HPARAMS["vae"])
    with torch.no_grad():
        for parameter in method.network.parameters():
            parameter.fill_(0.05)
        z = torch.full((2, method.hparams["latent_size"]), 50.0)
        out = method.decode(z)
    assert out.shape[1:] == (1, 32, 32)
    assert out.max() > 1.0 or out.min() < 0.0


def test_settings_are_passed_to_the_network_and_optimiser() -> None:
    method = build_method(
        "vae",
        **TINY_HPARAMS["vae"] | {"in_channels": 2},
        act="PRELU",
        norm="BATCH",
        optimizer="adamw",
        weight_decay=0.01,
    )
    assert (method.hparams["act"], method.hparams["norm"]) == ("PRELU", "BATCH")
    modules = list(method.network.modules())
    assert any(isinstance(m, torch.nn.PReLU) for m in modules)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in modules)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    first_conv = next(m for m in modules if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2
    optimizer = method.configure_optimizer(1e-4)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    images = torch.rand(2, 2, 32, 32)
    assert method(images).shape == (2, 2, 32, 32)
    with pytest.raises(InputError, match=r"slices of 16 × 32 px, but the model is built for"):
        method(torch.rand(2, 2, 16, 32))


def test_edges_are_allowed_and_bad_hyperparameters_named() -> None:
    tiny = TINY_HPARAMS["vae"]
    factor = 2 ** len(tiny["channels"])
    build_method("vae", **tiny | {"image_size": factor, "kl_weight": 0.0, "latent_size": 1})
    cases = [
        (
            {"optimizer": "sgd"},
            r"hyperparameter optimizer='sgd', expected one of \['adam', 'adamw'\]",
        ),
        (
            {"image_size": factor + 1},
            rf"image_size={factor + 1} must be a multiple of 2\^len\(channels\) = {factor} "
            r"\(channels \(",
        ),
        ({"kl_weight": -0.5}, r"hyperparameters kl_weight=-0.5 \(expected ≥ 0\)"),
        ({"latent_size": 0}, r"latent_size=0 \(expected ≥ 1\)"),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            build_method("vae", **tiny | extra)
