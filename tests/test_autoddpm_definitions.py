"""AutoDDPM (Bercea et al., ICML-W 2023; ci-ber/autoDDPM ``model_zoo/ddpm.py``,
``projects/autoddpm/autoddpm.yaml``) against its definition, written out in float64 numpy
independently of the implementation, with the UNet replaced by a plain function so that
each test takes milliseconds:

- training: x0 ∈ [0, 1] as it is; t ~ U{0, …, T−1}; ε ~ N(0, I);
  x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (linear β); the network predicts ε; loss MSE;
- scoring: x noised to ``recon_timestep`` and the ancestral DDPM chain (x̂0 clipped to
  [-1, 1], fixed-small variance, noise at every step but the last) over every stride-th
  timestep, respaced with β'_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_{k−1}}; x̂ clamped to [0, 1];
  r = |x − x̂| / its per-image percentile, clipped; m = r × perceptual map (a stand-in
  function here: the LPIPS network needs torchvision, absent on this environment; the LPIPS
  wrapper is tested with a stand-in ``lpips`` package); mask m > threshold dilated once
  3 × 3 (scipy as oracle); stitched (1 − M) x + M x̂; RePaint from the stitched image noised
  to ``inpaint_timestep`` with the known part x noised to t' and resampling by
  q(x_t | x_t'); final map |x − x_inpainted| × m.

The noise is the scoring generator's (seeded with ``score_seed``), replayed in the order the
definition draws it: q(x_t | x0), then one draw per chain step with t > 0; in each RePaint
step the known part, the denoising step, then the resampling.
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import scipy.ndimage
import torch
from monai.networks.schedulers import DDPMScheduler
from tiny_hparams import DDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import autoddpm as autoddpm_module
from brainuad.methods import build_method
from brainuad.methods.autoddpm import (
    AutoDDPM,
    _chain_stride,
    _check_timestep,
    _lpips_map,
    _respaced,
    calibrate_mask_threshold,
    dilate,
    normalised_residual,
    stitch,
)

TINY = DDPM_TINY  # the UNet at 32 px, a few thousand parameters


class Function(torch.nn.Module):
    """A plain function standing in for a submodule; records its calls."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return self.function(x, t)


def fake_epsilon(x, t):
    """ε̂ large enough for x̂0 to leave [-1, 1] (so the clipping matters); t per image."""
    return 2.5 * x - 0.4 + 0.001 * t.reshape(-1, 1, 1, 1)


def fake_perceptual(x, y):
    """A stand-in for spatial LPIPS: asymmetric in (x, x̂) and above 1 in places."""
    return 0.5 + 4.0 * ((x - y) ** 2).mean(axis=1) + 0.3 * x.mean(axis=1)


def linear_alphas_cumprod(n_timesteps: int, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
    return np.cumprod(1 - np.linspace(beta_start, beta_end, n_timesteps))


def float32_schedule(n_timesteps: int, beta_start=1e-4, beta_end=0.02):
    """(β, ᾱ) as the torch schedule holds them (float32, as in the reference), in float64.
    Near t = 0, β_t and 1 − ᾱ_t are of order 1e-4 and their float32 rounding (relative 1e-4)
    is amplified by the normalised residual of a short chain; these values are checked
    against the float64 formula (``linear_alphas_cumprod``) separately."""
    betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float32)
    return betas.double().numpy(), torch.cumprod(1 - betas, 0).double().numpy()


def _method(**settings) -> AutoDDPM:
    method = build_method("autoddpm", **TINY | settings)
    method.unet = Function(lambda x, t: fake_epsilon(x, t.to(x.dtype)))
    return method


def _images(batch=2, channels=1, size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator)


class Draws:
    """The scoring generator replayed: float32 standard normals, in float64."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, shape) -> np.ndarray:
        return torch.randn(shape, generator=self.generator).double().numpy()


def posterior_step(x, t, previous_t, schedule, draws, clipped):
    """One ancestral DDPM step x_t → x_t' (fixed-small variance; t' < 0: to x̂0), with the
    schedule's β_t at full length and β' = 1 − ᾱ_t / ᾱ_t' between respaced timesteps."""
    betas, abar = schedule
    abar_t = abar[t]
    abar_prev = abar[previous_t] if previous_t >= 0 else 1.0
    beta = betas[t] if t - previous_t == 1 else 1 - abar_t / abar_prev
    x0_hat = (x - np.sqrt(1 - abar_t) * fake_epsilon(x, np.full(x.shape[0], t))) / np.sqrt(abar_t)
    clipped.append(np.abs(x0_hat).max() > 1)
    x0_hat = np.clip(x0_hat, -1, 1)
    mean = (
        np.sqrt(abar_prev) * beta / (1 - abar_t) * x0_hat
        + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t) * x
    )
    if t == 0:
        return mean
    variance = (1 - abar_prev) / (1 - abar_t) * beta
    return mean + np.sqrt(variance) * draws(x.shape)


def score_by_hand(x, settings, schedule, perceptual):
    """The whole scoring of a batch x [B, C, H, W], float64; returns (map, reconstruction,
    combined map, mask, UNet timesteps, whether x̂0 was clipped somewhere)."""
    stride = settings["stride"]
    abar = schedule[1]
    draws = Draws(settings.get("score_seed", 0))
    clipped, timesteps = [], []
    # 1. reconstruction from recon_timestep over every stride-th timestep
    start = settings["recon_timestep"]
    sample = np.sqrt(abar[start]) * x + np.sqrt(1 - abar[start]) * draws(x.shape)
    for t in range(start, -1, -stride):
        timesteps.append(t)
        sample = posterior_step(sample, t, t - stride, schedule, draws, clipped)
    reconstruction = np.clip(sample, 0, 1)
    # 2.-3. normalised residual × perceptual map
    residual = np.abs(x - reconstruction).mean(axis=1)
    scale = np.percentile(residual.reshape(len(x), -1), settings["residual_percentile"], axis=1)
    combined = np.clip(residual / np.maximum(scale, 1e-8)[:, None, None], 0, 1)
    if perceptual is not None:
        combined = combined * perceptual(x, reconstruction)
    # 4. threshold, one 3 × 3 dilation (the border does not grow it, as cv2.dilate)
    threshold = settings["mask_threshold"]
    if threshold is None:
        per_image = np.percentile(combined.reshape(len(x), -1), settings["mask_percentile"], axis=1)
        threshold = np.clip(per_image, 0, 1)[:, None, None]
    binary = combined > threshold
    mask = np.stack([scipy.ndimage.binary_dilation(m, structure=np.ones((3, 3))) for m in binary])[
        :, None
    ].astype(np.float64)
    # 5. stitched
    stitched = (1 - mask) * x + mask * reconstruction
    # 6. RePaint from the stitched image noised to inpaint_timestep
    start = settings["inpaint_timestep"]
    sample = np.sqrt(abar[start]) * stitched + np.sqrt(1 - abar[start]) * draws(x.shape)
    resamplings = settings["resample_steps"]
    for t in range(start, 0, -stride):
        previous_t = t - stride
        for u in range(resamplings):
            known = np.sqrt(abar[previous_t]) * x + np.sqrt(1 - abar[previous_t]) * draws(x.shape)
            timesteps.append(t)
            unknown = posterior_step(sample, t, previous_t, schedule, draws, clipped)
            previous = mask * unknown + (1 - mask) * known
            if u < resamplings - 1:
                ratio = abar[t] / abar[previous_t]
                sample = np.sqrt(ratio) * previous + np.sqrt(1 - ratio) * draws(x.shape)
        sample = previous
    inpainted = np.clip(mask * sample + (1 - mask) * x, 0, 1)
    # 7. final map
    anomaly_map = np.abs(x - inpainted).mean(axis=1) * combined
    return anomaly_map, inpainted, combined, mask, timesteps, any(clipped)


CASES = [
    # full-length chain (stride 1), per-image 95th-percentile mask, residual alone
    {
        "inference_steps": 1000,
        "recon_timestep": 3,
        "inpaint_timestep": 2,
        "resample_steps": 2,
    },
    # respaced (stride 100), two sequences, a fixed threshold and a perceptual map
    {
        "in_channels": 2,
        "inference_steps": 10,
        "recon_timestep": 200,
        "inpaint_timestep": 200,
        "resample_steps": 3,
        "mask_threshold": 2.0,
        "score_seed": 3,
        "perceptual": True,
    },
    # another schedule and T, other percentiles, the perceptual map above 1
    {
        "num_train_timesteps": 500,
        "beta_start": 2e-4,
        "beta_end": 0.03,
        "inference_steps": 50,
        "recon_timestep": 30,
        "inpaint_timestep": 20,
        "resample_steps": 2,
        "residual_percentile": 80.0,
        "mask_percentile": 70.0,
        "perceptual": True,
    },
]


@pytest.mark.parametrize("case", CASES)
def test_scoring_by_hand(case: dict) -> None:
    settings = dict(case)
    use_perceptual = settings.pop("perceptual", False)
    method = _method(**settings)
    if use_perceptual:
        method.perceptual = lambda x, y: torch.from_numpy(
            fake_perceptual(x.double().numpy(), y.double().numpy())
        ).float()
    batch = 3 if settings.get("in_channels", 1) > 1 else 2  # B ≠ C: t has one entry per slice
    images = _images(batch=batch, channels=settings.get("in_channels", 1))
    out = method.score(images, torch.ones(batch, 1, 16, 16))

    n_timesteps = settings.get("num_train_timesteps", 1000)
    schedule = float32_schedule(
        n_timesteps, settings.get("beta_start", 1e-4), settings.get("beta_end", 0.02)
    )
    np.testing.assert_allclose(
        schedule[1],
        linear_alphas_cumprod(
            n_timesteps, settings.get("beta_start", 1e-4), settings.get("beta_end", 0.02)
        ),
        rtol=1e-5,
    )
    definition = {
        "stride": n_timesteps // settings["inference_steps"],
        "residual_percentile": 95.0,
        "mask_percentile": 95.0,
        "mask_threshold": None,
    } | settings
    expected_map, expected_rec, combined, mask, timesteps, clipped = score_by_hand(
        images.double().numpy(),
        definition,
        schedule,
        fake_perceptual if use_perceptual else None,
    )
    assert clipped or definition["stride"] < 100  # x̂0 left [-1, 1] on the long steps
    assert 0 < mask.mean() < 1
    calls = method.unet.calls
    assert [int(t[0]) for _, t in calls] == timesteps
    assert all(
        t.dtype == torch.long and t.shape == (batch,) and (t == t[0]).all() for _, t in calls
    )
    np.testing.assert_allclose(out.reconstruction.numpy(), expected_rec, atol=2e-4)
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected_map, atol=2e-4)
    # the pieces on their own, on the implementation's reconstruction
    reconstruction = method.reconstruct(images, torch.Generator().manual_seed(method.score_seed))
    m = method.combined_map(images, reconstruction)
    np.testing.assert_allclose(m.numpy(), combined, atol=2e-4)
    assert np.mean(method.anomaly_mask(m).numpy() == mask) > 0.99  # ties at the threshold


def test_training_objective_by_hand(monkeypatch) -> None:
    settings = {"num_train_timesteps": 10, "inference_steps": 10, "recon_timestep": 5}
    method = _method(**settings, inpaint_timestep=2)
    method.unet = Function(lambda x, t: 0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1))
    images = _images(batch=256, size=4).double()  # cast to float32 by the method
    torch.manual_seed(3)
    loss = method.training_loss({"image": images, "brainmask": torch.ones_like(images)})
    torch.manual_seed(3)
    t = torch.randint(0, 10, (256,))
    epsilon = torch.randn(images.shape).double().numpy()
    abar = linear_alphas_cumprod(10)[t.numpy()][:, None, None, None]
    x0 = images.numpy()  # in [0, 1], not mapped to [-1, 1]
    noisy = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * epsilon
    predicted = 0.5 * noisy + 0.01 * t.numpy()[:, None, None, None]
    assert loss.ndim == 0 and loss.dtype == torch.float32
    np.testing.assert_allclose(float(loss), np.mean((predicted - epsilon) ** 2), rtol=1e-5)
    ((seen_x, seen_t),) = method.unet.calls
    assert seen_x.dtype == torch.float32 and seen_t.dtype == torch.long
    assert torch.equal(seen_t, t) and sorted(set(t.tolist())) == list(range(10))  # 0 … T − 1
    np.testing.assert_allclose(seen_x.double().numpy(), noisy, atol=1e-5)
    # the method's forward is the UNet's ε prediction
    x, steps = torch.rand(2, 1, 4, 4), torch.tensor([1, 7])
    assert torch.equal(method(x, steps), 0.5 * x + 0.01 * steps.reshape(-1, 1, 1, 1))


def test_respaced_chain_is_the_ddpm_over_every_stride_th_timestep() -> None:
    base = DDPMScheduler(
        num_train_timesteps=20,
        schedule="linear_beta",
        beta_start=1e-3,
        beta_end=0.1,
        prediction_type="sample",
        clip_sample=False,
    )
    assert _respaced(base, 1) is base
    chain = _respaced(base, 4)
    abar = linear_alphas_cumprod(20, 1e-3, 0.1)[::4]
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    assert chain.num_train_timesteps == 5
    assert chain.prediction_type == "sample" and chain.clip_sample is False
    np.testing.assert_allclose(chain.alphas_cumprod.double().numpy(), abar, rtol=1e-6)
    np.testing.assert_allclose(chain.betas.double().numpy(), betas, rtol=1e-4)
    np.testing.assert_allclose(chain.alphas.double().numpy(), 1 - betas, rtol=1e-6)
    # a step from chain index 3 (t = 12) to index 2 (t = 8): the posterior of the pair
    x, x0 = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    previous, _ = chain.step(x0, 3, x, generator=generator)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).double().numpy()
    a_t, a_prev, beta = abar[3], abar[2], betas[3]
    mean = (
        np.sqrt(a_prev) * beta / (1 - a_t) * x0.double().numpy()
        + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x.double().numpy()
    )
    expected = mean + np.sqrt((1 - a_prev) / (1 - a_t) * beta) * noise
    np.testing.assert_allclose(previous.double().numpy(), expected, atol=1e-5)


def test_chain_stride_is_t_over_inference_steps_for_divisors_only() -> None:
    assert _chain_stride(1000, 1000) == 1
    assert _chain_stride(1000, 10) == 100
    assert _chain_stride(1000, 1) == 1000
    assert _chain_stride(12, 4) == 3
    for steps in (0, -4, 7, 1001, 2000):
        with pytest.raises(
            InputError,
            match=rf"^hyperparameter inference_steps={steps}, expected a divisor of "
            r"num_train_timesteps \(1000\)$",
        ):
            _chain_stride(1000, steps)


def test_check_timestep_accepts_multiples_of_the_stride_in_range() -> None:
    for value in (0, 10, 90):
        _check_timestep("recon_timestep", value, 10, 100, 0)
    _check_timestep("inpaint_timestep", 10, 10, 100, 10)
    _check_timestep("x", 99, 1, 100, 1)
    for value, minimum in ((100, 0), (-10, 0), (15, 0), (0, 10), (1, 0)):
        message = (
            rf"^hyperparameter t={value}, expected a multiple of the chain stride 10 "
            rf"\(num_train_timesteps / inference_steps\) in \[{minimum}, 99\]$"
        )
        with pytest.raises(InputError, match=message):
            _check_timestep("t", value, 10, 100, minimum)


def test_normalised_residual_by_its_definition() -> None:
    images, reconstruction = _images(batch=3, channels=2), _images(batch=3, channels=2, seed=4)
    for percentile in (95.0, 50.0, 100.0):
        r = np.abs(images.double().numpy() - reconstruction.double().numpy()).mean(axis=1)
        scale = np.percentile(r.reshape(3, -1), percentile, axis=1)[:, None, None]
        expected = np.clip(r / scale, 0, 1)
        got = normalised_residual(images, reconstruction, percentile)
        assert got.shape == (3, 16, 16)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    # a percentile of 0 (residual in few pixels): divided by a tiny constant, so those count fully
    images = torch.zeros(1, 1, 10, 10)
    reconstruction = images.clone()
    reconstruction[0, 0, 0, :2] = torch.tensor([0.5, 1e-7])
    r = normalised_residual(images, reconstruction, 95.0)
    assert r[0, 0, 0] == 1 and r[0, 0, 1] == 1 and r.sum() == 2


def test_dilation_is_one_3x3_binary_dilation_not_growing_from_the_border() -> None:
    generator = torch.Generator().manual_seed(2)
    mask = (torch.rand(3, 1, 9, 11, generator=generator) > 0.9).float()
    mask[1] = 0
    mask[2, 0, 0, 0] = 1
    expected = [
        scipy.ndimage.binary_dilation(m[0].numpy() > 0, structure=np.ones((3, 3))) for m in mask
    ]
    got = dilate(mask)
    assert got.shape == mask.shape
    np.testing.assert_array_equal(got[:, 0].numpy(), np.stack(expected).astype(np.float32))


def test_stitch_by_its_formula() -> None:
    images, reconstruction = _images(channels=2), _images(channels=2, seed=5)
    mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(6)) > 0.5).float()
    expected = (1 - mask) * images + mask * reconstruction
    assert torch.equal(stitch(images, reconstruction, mask), expected)


def test_anomaly_mask_threshold_is_strict_and_the_percentile_clipped_to_one() -> None:
    combined = torch.zeros(2, 10, 10)
    combined[0, 5, 5] = 0.3
    combined[0, 1, 1] = 0.31
    combined[1].view(-1)[:] = torch.linspace(0, 3, 100)  # 95th percentile 2.85, clipped to 1
    fixed = _method(mask_threshold=0.3).anomaly_mask(combined)
    assert fixed.shape == (2, 1, 10, 10) and fixed.dtype == torch.float32
    assert fixed[0, 0, 4:7, 4:7].sum() == 0  # 0.3 is not above 0.3
    assert fixed[0, 0].sum() == 9 and fixed[0, 0, 0:3, 0:3].sum() == 9
    per_image = _method(mask_percentile=95.0).anomaly_mask(combined)[:, 0]
    above_one = scipy.ndimage.binary_dilation(combined[1].numpy() > 1, structure=np.ones((3, 3)))
    np.testing.assert_array_equal(per_image[1].numpy(), above_one.astype(np.float32))
    # a fixed 0 masks every nonzero pixel, a fixed threshold above the map none
    assert _method(mask_threshold=0.0).anomaly_mask(combined)[1].sum() == 100
    assert _method(mask_threshold=5.0).anomaly_mask(combined).sum() == 0
    # the percentile is clipped to [0, 1] from below too: a map below 0 masks nothing
    assert _method().anomaly_mask(combined - 4.0).sum() == 0


def test_reconstruction_and_inpainting_are_clamped_to_the_image_range(monkeypatch) -> None:
    method = _method(inference_steps=10, recon_timestep=100, inpaint_timestep=100)
    images = _images()
    # a chain leaving [0, 1]: x̂ = clamp(·, 0, 1) (step 1)
    monkeypatch.setattr(method, "_denoise_step", lambda sample, t, generator: 3 * sample - 1)
    generator = torch.Generator().manual_seed(0)
    noised = method._noised(images, 100, generator)
    chain = 3 * (3 * noised - 1) - 1  # two steps: t = 100, 0
    reconstruction = method.reconstruct(images, torch.Generator().manual_seed(0))
    assert torch.equal(reconstruction, chain.clamp(0, 1))
    assert chain.max() > 1.5 and chain.min() < -0.5
    # an inpainting leaving [0, 1]: the returned reconstruction and the final map use it clamped
    inpainted = 2.5 * images - 0.7
    monkeypatch.setattr(method, "reconstruct", lambda x, generator: x.flip(-1))
    monkeypatch.setattr(method, "inpaint", lambda x, stitched, mask, generator: inpainted)
    out = method.score(images, torch.ones(2, 1, 16, 16))
    clamped = inpainted.clamp(0, 1)
    assert torch.equal(out.reconstruction, clamped)
    combined = method.combined_map(images, images.flip(-1))
    torch.testing.assert_close(out.anomaly_map, (images - clamped).abs().mean(1) * combined)


def test_inpainting_ends_with_the_input_outside_the_mask() -> None:
    method = _method(inference_steps=10, inpaint_timestep=100, resample_steps=1)
    images = _images()
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:9, 4:9] = 1
    out = method.inpaint(images, images.flip(-1), mask, torch.Generator().manual_seed(0))
    outside = mask.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])
    assert not torch.equal(out[~outside], images[~outside])


class FakeLPIPS(torch.nn.Module):
    """Stands in for ``lpips.LPIPS``: records its arguments; d(a, b) = (a − b)² + 0.1 a."""

    created: ClassVar[list[dict]] = []

    def __init__(self, **kwargs) -> None:
        super().__init__()
        FakeLPIPS.created.append(kwargs)

    def forward(self, a, b):
        assert a.shape[1] == 1
        return (a - b) ** 2 + 0.1 * a


@pytest.mark.parametrize(("scaling", "factor", "offset"), [("standard", 2, 1), ("reference", 4, 3)])
def test_lpips_map_calls_spatial_squeezenet_lpips_per_channel(
    monkeypatch, tmp_path, scaling, factor, offset
) -> None:
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    FakeLPIPS.created.clear()
    weights = tmp_path / "squeeze.pth"
    weights.write_bytes(b"")
    method = _method(in_channels=2, lpips_weights=weights, lpips_scaling=scaling)
    assert method.hparams["lpips_weights"] == str(weights)
    assert FakeLPIPS.created == [
        {
            "pretrained": True,
            "net": "squeeze",
            "spatial": True,
            "model_path": str(weights),
            "verbose": False,
        }
    ]
    assert "perceptual" not in dict(method.named_modules())  # not saved with the weights
    x, y = _images(channels=2).double(), _images(channels=2, seed=9).double()
    got = method.perceptual(x, y)
    a, b = factor * x.numpy() - offset, factor * y.numpy() - offset
    expected = ((a - b) ** 2 + 0.1 * a).mean(axis=1)
    assert got.shape == (2, 16, 16) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # and the combined map is the normalised residual times it
    combined = method.combined_map(x.float(), y.float())
    np.testing.assert_allclose(
        combined.numpy(),
        (normalised_residual(x, y, 95.0) * got).numpy(),
        atol=1e-5,
    )


def test_lpips_without_weights_or_package_fails_naming_what_is_missing(
    monkeypatch, tmp_path
) -> None:
    missing = str(tmp_path / "squeeze.pth")
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    with pytest.raises(InputError) as error:
        _lpips_map(missing, "standard")
    message = str(error.value)
    assert message.startswith(
        f"hyperparameter lpips_weights={missing!r} (SqueezeNet LPIPS v0.1 linear layers, "
        f"squeeze.pth): the weight file {missing!r} does not exist; the 'lpips' package "
        "(with torchvision) cannot be imported: "
    )
    assert message.endswith(
        ". Set lpips_weights: null to score with the normalised residual alone."
    )
    (tmp_path / "squeeze.pth").write_bytes(b"")
    with pytest.raises(InputError, match="'lpips' package") as error:
        build_method("autoddpm", **TINY, lpips_weights=missing)
    assert "does not exist" not in str(error.value)
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    with pytest.raises(InputError, match="does not exist") as error:
        _lpips_map(str(tmp_path / "other.pth"), "standard")
    assert "package" not in str(error.value)


def _recording_unet(monkeypatch) -> list[dict]:
    seen: list[dict] = []

    def build(**kwargs):
        seen.append(kwargs)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(autoddpm_module, "build_diffusion_unet", build)
    return seen


def test_defaults_are_the_references(monkeypatch) -> None:
    # projects/autoddpm/autoddpm.yaml (UNet, noise_level_recon 200, noise_level_inpaint 50,
    # resample_steps 5, inference_steps 1000, Adam lr 1e-4, batch 16); model_zoo/ddpm.py
    # (95th percentiles); net_utils/scheduler.py (linear β 1e-4 … 0.02, T = 1000)
    seen = _recording_unet(monkeypatch)
    method = AutoDDPM()
    assert method.hparams == {
        "in_channels": 1,
        "channels": (128, 256, 256),
        "attention_levels": (False, True, True),
        "num_res_blocks": 1,
        "num_head_channels": 256,
        "norm_num_groups": 32,
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "inference_steps": 1000,
        "recon_timestep": 200,
        "inpaint_timestep": 50,
        "resample_steps": 5,
        "residual_percentile": 95.0,
        "mask_threshold": None,
        "mask_percentile": 95.0,
        "lpips_weights": None,
        "lpips_scaling": "standard",
        "score_seed": 0,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    assert seen == [
        {
            "in_channels": 1,
            "channels": (128, 256, 256),
            "attention_levels": (False, True, True),
            "num_res_blocks": 1,
            "num_head_channels": 256,
            "norm_num_groups": 32,
        }
    ]
    assert method.perceptual is None and method.stride == 1 and method.chain is method.scheduler
    scheduler = method.scheduler
    assert scheduler.num_train_timesteps == 1000
    assert scheduler.prediction_type == "epsilon" and scheduler.clip_sample is True
    assert scheduler.variance_type == "fixed_small"
    np.testing.assert_allclose(
        scheduler.alphas_cumprod.double().numpy(), linear_alphas_cumprod(1000), rtol=1e-5
    )
    assert AutoDDPM.default_learning_rate == 1e-4 and AutoDDPM.default_batch_size == 16
    assert AutoDDPM.supervision == "healthy" and AutoDDPM.has_reconstruction is True
    assert type(method.configure_optimizer(1e-4)) is torch.optim.Adam


def test_hyperparameters_are_recorded_and_reach_the_parts(monkeypatch) -> None:
    seen = _recording_unet(monkeypatch)
    settings = {
        "in_channels": 2,
        "channels": [8, 16, 16],
        "attention_levels": [False, False, True],
        "num_res_blocks": 2,
        "num_head_channels": 4,
        "norm_num_groups": 4,
        "num_train_timesteps": 600,
        "beta_start": 2e-4,
        "beta_end": 0.03,
        "inference_steps": 60,
        "recon_timestep": 590,
        "inpaint_timestep": 10,
        "resample_steps": 1,
        "residual_percentile": 100,
        "mask_threshold": 0,
        "mask_percentile": 1,
        "lpips_weights": None,
        "lpips_scaling": "reference",
        "score_seed": 4,
        "optimizer": "adamw",
        "weight_decay": 0.01,
    }
    method = AutoDDPM(**settings)
    expected = settings | {
        "channels": (8, 16, 16),
        "attention_levels": (False, False, True),
        "residual_percentile": 100.0,
        "mask_threshold": 0.0,
        "mask_percentile": 1.0,
    }
    assert method.hparams == expected
    assert [type(method.hparams[k]) for k in ("residual_percentile", "mask_threshold")] == [
        float,
        float,
    ]
    assert seen == [
        {k: expected[k] for k in ("in_channels", "num_res_blocks", "num_head_channels")}
        | {
            "channels": [8, 16, 16],
            "attention_levels": [False, False, True],
            "norm_num_groups": 4,
        }
    ]
    assert method.stride == 10 and method.score_seed == 4
    scheduler = method.scheduler
    assert scheduler.num_train_timesteps == 600
    np.testing.assert_allclose(
        scheduler.alphas_cumprod.double().numpy(),
        linear_alphas_cumprod(600, 2e-4, 0.03),
        rtol=1e-5,
    )
    assert method.chain.num_train_timesteps == 60
    np.testing.assert_allclose(
        method.chain.alphas_cumprod.numpy(), scheduler.alphas_cumprod[::10].numpy()
    )
    optimizer = method.configure_optimizer(1e-4)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert AutoDDPM.scoring_hparams == {
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


def test_hyperparameter_edges_and_messages(monkeypatch) -> None:
    _recording_unet(monkeypatch)
    base = {"num_train_timesteps": 100, "inference_steps": 10, "recon_timestep": 50}
    base |= {"inpaint_timestep": 20}
    for edge in (
        {"recon_timestep": 0},
        {"recon_timestep": 90},
        {"inpaint_timestep": 10},
        {"inpaint_timestep": 90},
        {"resample_steps": 1},
        {"residual_percentile": 100.0, "mask_percentile": 100.0},
        {"residual_percentile": 1e-3, "mask_percentile": 1e-3},
        {"mask_threshold": 0.0},
    ):
        AutoDDPM(**base | edge)
    stride = r"expected a multiple of the chain stride 10 \(num_train_timesteps / inference_steps\)"
    cases = [
        ({"inference_steps": 0}, r"inference_steps=0, expected a divisor of num_train_timesteps"),
        ({"inference_steps": 101}, r"inference_steps=101, expected a divisor"),
        ({"inference_steps": 30}, r"inference_steps=30, expected a divisor"),
        ({"recon_timestep": 100}, rf"recon_timestep=100, {stride} in \[0, 99\]"),
        ({"recon_timestep": -10}, r"recon_timestep=-10, expected"),
        ({"recon_timestep": 55}, r"recon_timestep=55, expected"),
        ({"inpaint_timestep": 0}, rf"inpaint_timestep=0, {stride} in \[10, 99\]"),
        ({"inpaint_timestep": 100}, r"inpaint_timestep=100, expected"),
        ({"inpaint_timestep": 25}, r"inpaint_timestep=25, expected"),
        ({"resample_steps": 0}, r"^hyperparameter resample_steps=0, expected ≥ 1$"),
        (
            {"residual_percentile": 0},
            r"^hyperparameter residual_percentile=0.0, expected \(0, 100\]$",
        ),
        ({"residual_percentile": 100.5}, r"residual_percentile=100.5, expected \(0, 100\]"),
        ({"mask_percentile": 0}, r"^hyperparameter mask_percentile=0.0, expected \(0, 100\]$"),
        ({"mask_percentile": 101}, r"mask_percentile=101.0, expected \(0, 100\]"),
        (
            {"mask_threshold": -0.1},
            r"^hyperparameter mask_threshold=-0.1, expected ≥ 0 or null \(per-image "
            r"mask_percentile\)$",
        ),
        ({"lpips_scaling": "double"}, r"lpips_scaling='double', expected one of"),
        ({"optimizer": "sgd"}, r"optimizer='sgd', expected one of \['adam', 'adamw'\]"),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            AutoDDPM(**base | extra)


def _calibration_method(monkeypatch, settings=None):
    method = _method(**(settings or {}))
    modes = []

    def reconstruct(x, generator):
        modes.append(method.training)
        return (x.flip(-1) + 0.1 * x**2).clamp(0, 1)

    monkeypatch.setattr(method, "reconstruct", reconstruct)
    return method, modes


def test_calibrated_threshold_is_the_quantile_of_healthy_brain_combined_values(
    monkeypatch,
) -> None:
    method, modes = _calibration_method(monkeypatch)
    images = _images(batch=5)
    brainmask = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(2)) > 0.4
    brainmask = brainmask.float()
    combined = method.combined_map(images, method.reconstruct(images, None))
    pooled = np.sort(combined[brainmask[:, 0] > 0].numpy())
    modes.clear()
    method.train()
    for quantile in (0.9, 0.5, 0.999):
        for batch_size in (2, 16):
            threshold = calibrate_mask_threshold(
                method, images, brainmask, quantile=quantile, batch_size=batch_size
            )
            index = min(int(quantile * pooled.size), pooled.size - 1)
            assert threshold == pytest.approx(float(pooled[index]), abs=1e-7)
            assert isinstance(threshold, float)
    assert method.training  # the mode is given back
    assert modes and not any(modes)  # scored in eval mode
    method.eval()
    calibrate_mask_threshold(method, images, brainmask)
    assert not method.training
    # the default quantile: 95 % of healthy brain under the threshold
    default = calibrate_mask_threshold(method, images, brainmask)
    assert default == pytest.approx(float(pooled[int(0.95 * pooled.size)]), abs=1e-7)


def test_calibration_reconstructs_with_the_scoring_seed_and_refuses_bad_input(monkeypatch):
    method = _method(inference_steps=10, recon_timestep=100, inpaint_timestep=100, score_seed=5)
    images = _images(batch=3)
    brainmask = torch.ones(3, 1, 16, 16)
    threshold = calibrate_mask_threshold(method, images, brainmask, quantile=0.5, batch_size=2)
    generator = torch.Generator().manual_seed(5)
    maps = [
        method.combined_map(batch, method.reconstruct(batch, generator))
        for batch in (images[:2], images[2:])
    ]
    pooled = torch.cat(maps).flatten().sort().values
    assert threshold == float(pooled[int(0.5 * pooled.numel())])
    for quantile in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(
            InputError, match=rf"^calibrate_mask_threshold: quantile={quantile}, expected \(0, 1\)$"
        ):
            calibrate_mask_threshold(method, images, brainmask, quantile=quantile)
    with pytest.raises(InputError, match="no brain pixels in the given slices"):
        calibrate_mask_threshold(method, images, torch.zeros_like(brainmask))
