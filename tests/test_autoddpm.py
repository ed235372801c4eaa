"""AutoDDPM: what makes it itself (mask, stitch, RePaint resampling, the combined map)."""

import numpy as np
import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.autoddpm import (
    calibrate_mask_threshold,
    dilate,
    normalised_residual,
    stitch,
)


def _method(**overrides):
    torch.manual_seed(0)
    return build_method("autoddpm", **{**TINY_HPARAMS["autoddpm"], **overrides})


def _images(batch=2, size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, size, size, generator=generator)
    return images, torch.ones(batch, 1, size, size)


def test_stitched_image_is_input_outside_mask_and_reconstruction_inside(monkeypatch):
    method = _method()
    images, brainmask = _images()
    reconstruction = 1.0 - images
    seen = {}

    def fake_inpaint(images_, stitched, mask, generator):
        seen.update(stitched=stitched, mask=mask)
        return images_

    monkeypatch.setattr(method, "reconstruct", lambda x, generator: reconstruction)
    monkeypatch.setattr(method, "inpaint", fake_inpaint)
    method.score(images, brainmask)
    inside = seen["mask"].expand_as(images) > 0
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(seen["stitched"][inside], reconstruction[inside])
    assert torch.equal(seen["stitched"][~inside], images[~inside])
    # The same through the helper, for an arbitrary mask.
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    stitched = stitch(images, reconstruction, mask)
    assert torch.equal(stitched, mask * reconstruction + (1 - mask) * images)


def test_final_map_is_zero_where_the_inpainting_equals_the_input(monkeypatch):
    method = _method()
    images, brainmask = _images()
    region = torch.zeros_like(images, dtype=torch.bool)
    region[..., :16] = True  # the inpainting equals the input in the left half only
    monkeypatch.setattr(method, "reconstruct", lambda x, generator: 1.0 - x)
    monkeypatch.setattr(
        method,
        "inpaint",
        lambda x, stitched, mask, generator: torch.where(region, x, 1.0 - x),
    )
    out = method.score(images, brainmask)
    combined = method.combined_map(images, 1.0 - images)
    assert torch.all(out.anomaly_map[..., :16] == 0)
    right = out.anomaly_map[..., 16:]
    expected = (images - (1.0 - images)).abs()[:, 0, :, 16:] * combined[..., 16:]
    assert torch.allclose(right, expected)
    assert right.max() > 0.1
    assert torch.equal(out.reconstruction, torch.where(region, images, 1.0 - images))


def test_percentile_normalisation_divides_by_the_95th_percentile_and_clips():
    values = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    r = normalised_residual(torch.zeros_like(values), values, 95.0)
    p95 = np.percentile(np.arange(100), 95)  # 94.05, linear interpolation as the reference
    expected = np.clip(np.arange(100) / p95, 0, 1).reshape(1, 10, 10)
    assert np.allclose(r.numpy(), expected, atol=1e-6)
    assert r.max() == 1.0 and r.min() == 0.0
    assert int((r == 1.0).sum()) == 5  # 95 … 99 exceed the percentile and are clipped
    # Per image: a second image ten times brighter gives the same normalised map.
    both = torch.cat([values, 10 * values])
    r_both = normalised_residual(torch.zeros_like(both), both, 95.0)
    assert torch.allclose(r_both[0], r_both[1], atol=1e-6)


def test_percentile_normalisation_of_an_exact_reconstruction_is_zero():
    images, _ = _images()
    assert torch.all(normalised_residual(images, images, 95.0) == 0)


def test_repaint_known_region_is_the_input_noised_to_the_previous_timestep(monkeypatch):
    method = _method(inference_steps=1000, inpaint_timestep=3, resample_steps=2)
    images, _ = _images(batch=1)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    inside = mask.expand_as(images) > 0
    stitched = torch.full_like(images, -5.0)
    noised_calls, denoise_calls = [], []

    def fake_noised(x0, timestep, generator):
        # Tags the result with its source and noise level: x0 + 10 t.
        noised_calls.append((x0.clone(), timestep))
        return x0 + 10.0 * timestep

    def fake_denoise(sample, timestep, generator):
        denoise_calls.append((sample.clone(), timestep))
        return torch.full_like(sample, 100.0 + timestep)

    monkeypatch.setattr(method, "_noised", fake_noised)
    monkeypatch.setattr(method, "_denoise_step", fake_denoise)
    monkeypatch.setattr(method, "_randn", lambda like, generator: torch.zeros_like(like))
    out = method.inpaint(images, stitched, mask, torch.Generator())

    # Start: the stitched image noised to 3; then each step's known part is the input at t−1.
    assert torch.equal(noised_calls[0][0], stitched) and noised_calls[0][1] == 3
    assert [t for _, t in noised_calls[1:]] == [2, 2, 1, 1, 0, 0]
    assert all(torch.equal(x0, images) for x0, _ in noised_calls[1:])
    assert [t for _, t in denoise_calls] == [3, 3, 2, 2, 1, 1]
    alphas_cumprod = method.scheduler.alphas_cumprod
    for (sample, t), (_, previous_t) in zip(denoise_calls[1:], denoise_calls[:-1], strict=True):
        if t == previous_t:  # a resampling: x_{t−1} taken back to t (noise patched to 0)
            factor = (alphas_cumprod[t] / alphas_cumprod[t - 1]).sqrt()
            known, unknown = factor * (images + 10.0 * (t - 1)), factor * (100.0 + t)
        else:  # the next step starts from x_{t}: known = the input noised to t
            known, unknown = images + 10.0 * t, torch.full_like(images, 100.0 + previous_t)
        assert torch.allclose(sample[~inside], known[~inside])
        assert torch.allclose(sample[inside], unknown.expand_as(images)[inside])
    # The end: the input itself outside the mask, the last step's output inside.
    assert torch.equal(out[~inside], images[~inside])
    assert torch.all(out[inside] == 101.0)


def test_scoring_is_deterministic_and_seeded():
    method = _method()
    images, brainmask = _images(batch=3)
    first = method.score(images, brainmask)
    second = method.score(images, brainmask)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.reconstruction, second.reconstruction)
    method.hparams["score_seed"] = 1
    other = method.score(images, brainmask)
    assert not torch.equal(first.anomaly_map, other.anomaly_map)


def test_unet_evaluations_follow_the_chain_lengths(monkeypatch):
    # Stride 50, 5 + 1 × 2 evaluations per slice (config/config.yaml: 1 resampling).
    method = _method(inference_steps=20, recon_timestep=200, inpaint_timestep=50, resample_steps=2)
    calls = []
    original = method.unet.forward
    monkeypatch.setattr(
        method.unet, "forward", lambda x, t, *a, **k: calls.append(t.tolist()) or original(x, t)
    )
    method.score(*_images(batch=2))
    assert calls == [[t, t] for t in (200, 150, 100, 50, 0, 50, 50)]


def test_respaced_chain_keeps_the_noise_levels():
    method = _method(inference_steps=20)
    assert torch.allclose(method.chain.alphas_cumprod, method.scheduler.alphas_cumprod[::50])
    assert torch.allclose(
        torch.cumprod(1 - method.chain.betas, 0), method.scheduler.alphas_cumprod[::50]
    )
    full = _method(inference_steps=1000)
    assert full.stride == 1 and full.chain is full.scheduler


def test_mask_threshold_fixed_or_per_image_percentile_then_dilated():
    combined = torch.zeros(2, 9, 9)
    combined[0, 4, 4] = 0.5
    combined[1, 0, 0] = 0.05
    fixed = _method(mask_threshold=0.13).anomaly_mask(combined)
    assert fixed.shape == (2, 1, 9, 9)
    assert fixed[0, 0].sum() == 9 and torch.all(fixed[0, 0, 3:6, 3:6] == 1)  # 3 × 3 block
    assert fixed[1].sum() == 0  # 0.05 is under 0.13
    per_image = _method().anomaly_mask(combined)  # 95th percentile of each image: 0
    assert per_image[1, 0].sum() == 4  # corner pixel dilated within the image only
    assert per_image[0, 0].sum() == 9


def test_dilate_grows_by_one_pixel():
    mask = torch.zeros(1, 1, 5, 5)
    mask[0, 0, 2, 2] = 1
    assert torch.equal(dilate(mask)[0, 0, 1:4, 1:4], torch.ones(3, 3))
    assert dilate(mask).sum() == 9


def test_combined_map_multiplies_by_the_perceptual_map_when_configured():
    method = _method()
    images, _ = _images()
    reconstruction = images.flip(-1)
    residual_only = method.combined_map(images, reconstruction)
    assert torch.equal(residual_only, normalised_residual(images, reconstruction, 95.0))
    perceptual = torch.rand(2, 32, 32)
    method.perceptual = lambda x, y: perceptual
    assert torch.allclose(method.combined_map(images, reconstruction), residual_only * perceptual)


def test_lpips_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match=r"weight file .*does not exist"):
        _method(lpips_weights=str(tmp_path / "squeeze.pth"))
    (tmp_path / "squeeze.pth").write_bytes(b"")
    try:
        import lpips  # noqa: F401
    except Exception:
        with pytest.raises(InputError, match="'lpips' package") as error:
            _method(lpips_weights=str(tmp_path / "squeeze.pth"))
        assert "does not exist" not in str(error.value)
        assert "lpips_weights: null" in str(error.value)


def test_invalid_chain_settings_are_input_errors():
    with pytest.raises(InputError, match="inference_steps=7"):
        _method(inference_steps=7)
    with pytest.raises(InputError, match="recon_timestep=150"):
        _method(inference_steps=10, recon_timestep=150)
    with pytest.raises(InputError, match="inpaint_timestep=0"):
        _method(inpaint_timestep=0)
    with pytest.raises(InputError, match="resample_steps=0"):
        _method(resample_steps=0)


def test_calibrated_mask_threshold_masks_the_chosen_share_of_healthy_brain(monkeypatch):
    method = _method()
    images, brainmask = _images(batch=3)
    brainmask[..., :4] = 0
    monkeypatch.setattr(method, "reconstruct", lambda x, generator: x.flip(-1))
    threshold = calibrate_mask_threshold(method, images, brainmask, quantile=0.9, batch_size=2)
    combined = method.combined_map(images, images.flip(-1))
    brain = combined[brainmask[:, 0] > 0]
    assert 0.08 <= (brain > threshold).float().mean() <= 0.1
