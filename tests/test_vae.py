"""What makes the VAE itself: the ELBO's KL term and weight, and scoring from the posterior
mean (the shared contract is in test_methods.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import build_method


def batch(b: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(b, 1, size, size, generator=generator)
    return {"image": images, "brainmask": torch.ones(b, 1, size, size)}


def test_kl_term_matches_torch_distributions(monkeypatch):
    method = build_method("vae", **TINY_HPARAMS["vae"])
    mu = torch.tensor([[0.0] * 8, [0.5, -1.0, 2.0, 0.0, 0.1, 0.2, 0.3, -0.4]])
    logvar = torch.tensor([[0.0] * 8, [0.3, -0.7, 0.0, 1.0, -2.0, 0.5, 0.0, 0.1]])
    monkeypatch.setattr(method.network, "encode_forward", lambda x: (mu, logvar))
    _, kl = method.elbo_terms(batch(b=2)["image"])
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=1)
    torch.testing.assert_close(kl, expected)
    assert kl[0].item() == pytest.approx(0.0, abs=1e-7)  # posterior = prior


def test_loss_is_reconstruction_plus_weighted_kl():
    data = batch()
    one = build_method("vae", **TINY_HPARAMS["vae"])
    two = build_method("vae", **TINY_HPARAMS["vae"], kl_weight=2.0)
    two.load_state_dict(one.state_dict())
    torch.manual_seed(3)
    rec, kl = one.elbo_terms(data["image"])
    torch.manual_seed(3)
    loss_one = one.training_loss(data)
    torch.manual_seed(3)
    loss_two = two.training_loss(data)
    torch.testing.assert_close(loss_one, (rec + kl).mean())
    torch.testing.assert_close(loss_two, (rec + 2.0 * kl).mean())
    # the weight scales the KL term only (to float32 rounding of the ~10^2 reconstruction)
    torch.testing.assert_close(loss_two - loss_one, kl.mean(), rtol=0, atol=1e-4)
    assert kl.min() > 0


def test_reconstruction_term_uses_the_decoder_std():
    data = batch()
    unit = build_method("vae", **TINY_HPARAMS["vae"])
    wide = build_method("vae", **TINY_HPARAMS["vae"], rec_log_std=1.0)
    wide.load_state_dict(unit.state_dict())
    torch.manual_seed(4)
    rec_unit, _ = unit.elbo_terms(data["image"])
    torch.manual_seed(4)
    rec_wide, _ = wide.elbo_terms(data["image"])
    torch.testing.assert_close(rec_wide, rec_unit / math.e**2)


def test_training_samples_but_scoring_uses_the_posterior_mean():
    data = batch()
    method = build_method("vae", **TINY_HPARAMS["vae"])
    torch.manual_seed(5)
    first = method.training_loss(data)
    second = method.training_loss(data)
    assert not torch.equal(first, second)  # z is sampled in training
    out = method.score(data["image"], data["brainmask"])
    again = method.score(data["image"], data["brainmask"])
    assert torch.equal(out.anomaly_map, again.anomaly_map)
    mu, _ = method.network.encode_forward(data["image"])
    with torch.no_grad():
        expected = method.network.decode_forward(mu, use_sigmoid=False)
    torch.testing.assert_close(out.reconstruction, expected)
    torch.testing.assert_close(
        out.anomaly_map, (data["image"] - out.reconstruction).abs().mean(dim=1)
    )
    # MONAI's own eval-mode forward decodes mu + std, not mu: not what we score.
    method.eval()
    with torch.no_grad():
        monai_reconstruction = method.network(data["image"])[0]
    assert not torch.allclose(monai_reconstruction, out.reconstruction)


def test_image_size_is_checked():
    method = build_method("vae", **TINY_HPARAMS["vae"])
    with pytest.raises(InputError, match="image_size=32"):
        method.score(torch.rand(1, 1, 64, 64), torch.ones(1, 1, 64, 64))
    with pytest.raises(InputError, match="image_size"):
        build_method("vae", image_size=40, channels=(8, 16, 32, 32))


def test_reference_architecture_sizes():
    method = build_method("vae")
    assert method.hparams["channels"] == (16, 32, 64, 256, 256)
    assert method.hparams["latent_size"] == 256 and method.hparams["image_size"] == 128
    mu, logvar = method.network.encode_forward(torch.rand(2, 1, 128, 128))
    assert mu.shape == logvar.shape == (2, 256)
