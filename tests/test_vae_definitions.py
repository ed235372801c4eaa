"""The VAE's ELBO terms written out (Kingma & Welling 2014, reparametrisation; Gaussian
decoder of standard deviation σ = exp(rec_log_std)): z = μ + ε · exp(½ log σ²_z) with
ε ~ N(0, I), reconstruction term ‖x̂(z) − x‖² / (2σ²) summed over each slice's pixels."""

from __future__ import annotations

import math

import torch
from tiny_hparams import TINY_HPARAMS

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
