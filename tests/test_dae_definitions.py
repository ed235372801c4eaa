"""The DAE (Kascenas et al., MIDL 2022; AntanasKascenas/DenoisingAE ``src/denoising.py``) by
its definition, written out independently of the implementation: the coarse noise
(N(0, std²) on a resolution² grid, bilinear with aligned corners, one circular shift per
batch, only where the channel sum exceeds 0.01), the training objective, the scoring blur
against scipy, the reference's hyperparameters and the checks of bad ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock
from scipy import ndimage

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.dae import coarse_noise, foreground_mask, gaussian_blur_map

TINY = {"channels": (8, 16, 16), "norm_num_groups": 4}


def bilinear_aligned(low: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of ``low`` ``[r, r]`` to ``[h, w]`` with aligned corners: output
    pixel i samples the input at i (r − 1) / (h − 1), linearly between its neighbours."""
    r = low.shape[0]
    rows = np.array(
        [np.interp(np.arange(h) * (r - 1) / (h - 1), np.arange(r), col) for col in low.T]
    ).T
    return np.array(
        [np.interp(np.arange(w) * (r - 1) / (w - 1), np.arange(r), row) for row in rows]
    )


def images_with_background(b: int = 2, c: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(b, c, h, w, generator=generator, dtype=torch.float64) * 0.9 + 0.1
    images[:, :, :3] = 0  # background rows
    images[0, :, 5, 4] = 0
    images[0, 0, 5, 4] = 0.01  # channel sum exactly 0.01: not foreground
    return images


@pytest.mark.parametrize(("resolution", "std"), [(4, 0.5), (16, 0.2)])
def test_coarse_noise_follows_the_definition(resolution: int, std: float) -> None:
    images = images_with_background()
    b, c, h, w = images.shape
    kwargs = {} if resolution == 16 else {"resolution": resolution, "std": std}  # defaults
    noise = coarse_noise(images, generator=torch.Generator().manual_seed(1), **kwargs)
    # the same draws, in the same order, from the same generator
    generator = torch.Generator().manual_seed(1)
    low = (torch.randn(b, c, resolution, resolution, generator=generator) * std).numpy()
    dy = int(torch.randint(0, h, (1,), generator=generator))
    dx = int(torch.randint(0, w, (1,), generator=generator))
    foreground = images.numpy().sum(axis=1) > 0.01
    assert not foreground[0, 5, 4] and foreground[0, 5, 3]
    expected = np.empty((b, c, h, w))
    for i in range(b):
        for j in range(c):
            up = bilinear_aligned(low[i, j].astype(np.float64), h, w)
            expected[i, j] = np.roll(up, (dy, dx), axis=(0, 1)) * foreground[i]
    assert noise.shape == images.shape and noise.dtype == images.dtype
    np.testing.assert_allclose(noise.numpy(), expected, atol=1e-6)
    # this draw shifts both axes, and by different amounts (and not by a multiple of C)
    assert dy and dx and dy != dx and dx % c


def test_coarse_noise_has_the_images_dtype() -> None:
    images = images_with_background()
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert coarse_noise(images.to(dtype), resolution=4).dtype == dtype


def test_foreground_is_a_channel_sum_above_one_hundredth() -> None:
    images = torch.zeros(1, 2, 1, 4)
    images[0, 0, 0] = torch.tensor([0.0, 0.004, 0.006, 0.5])
    images[0, 1, 0] = torch.tensor([0.0, 0.004, 0.006, 0.0])
    mask = foreground_mask(images)
    assert mask.shape == (1, 1, 1, 4) and mask.dtype == images.dtype
    assert mask.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # 0.008 no, 0.012 yes
    exact = torch.full((1, 1, 1, 1), 0.01)
    assert foreground_mask(exact).item() == 0.0  # strictly above


@pytest.mark.parametrize("sigma", [0.3, 0.6, 1.0, 1.7])
def test_map_blur_is_a_truncated_gaussian_with_edge_replication(sigma: float) -> None:
    generator = np.random.default_rng(3)
    maps = generator.random((2, 20, 17))
    maps[:, :, :4] += 2.0  # a strong edge near the border
    blurred = gaussian_blur_map(torch.from_numpy(maps), sigma).numpy()
    for k in range(2):
        expected = ndimage.gaussian_filter(maps[k], sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(blurred[k], expected, rtol=0, atol=1e-12)


def test_add_noise_and_training_loss_follow_the_objective() -> None:
    method = build_method("dae", in_channels=2, noise_resolution=4, noise_std=0.5, **TINY)
    images = images_with_background(c=2, h=16, w=16).float()
    noisy = method.add_noise(images, generator=torch.Generator().manual_seed(2))
    own = coarse_noise(images, resolution=4, std=0.5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(noisy, images + own)
    # the loss: squared error of the denoised noisy input against the clean image, on the
    # foreground, averaged over every pixel; the noise comes from the global RNG
    torch.manual_seed(5)
    loss = method.training_loss({"image": images, "brainmask": torch.ones_like(images[:, :1])})
    torch.manual_seed(5)
    noisy = images + coarse_noise(images, resolution=4, std=0.5)
    with torch.no_grad():
        denoised = method(noisy)
    expected = ((denoised - images) ** 2 * foreground_mask(images)).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_scoring_blurs_only_when_sigma_is_positive() -> None:
    images = images_with_background(c=2, h=16, w=16).float()
    brainmask = torch.ones_like(images[:, :1])
    plain = build_method("dae", in_channels=2, **TINY)
    blurred = build_method("dae", in_channels=2, map_blur_sigma=0.5, **TINY)
    blurred.load_state_dict(plain.state_dict())
    out = plain.score(images, brainmask)
    residual = (images - out.reconstruction).abs().mean(dim=1)
    torch.testing.assert_close(out.anomaly_map, residual)
    torch.testing.assert_close(
        blurred.score(images, brainmask).anomaly_map, gaussian_blur_map(residual, 0.5)
    )


def test_defaults_are_the_references() -> None:
    method = build_method("dae")
    assert method.hparams == {
        "in_channels": 1,
        "channels": (64, 128, 256, 512),
        "norm_num_groups": 8,
        "act": "SWISH",
        "noise_resolution": 16,
        "noise_std": 0.2,
        "weight_decay": 1e-5,
        "lr_cosine_steps": None,
        "map_blur_sigma": 0.0,
    }
    network = method.network
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert {type(m).__name__ for m in network.modules()} >= {"Swish"}
    assert not any(
        isinstance(m, torch.nn.LeakyReLU | torch.nn.InstanceNorm2d) for m in network.modules()
    )
    widths = sorted({m.out_channels for m in network.modules() if isinstance(m, torch.nn.Conv2d)})
    assert widths == [1, 64, 128, 256, 512]
    ups = [m for m in network.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 3 and all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
    assert isinstance(network.output_block, UnetOutBlock)


def test_cosine_schedule_reaches_zero_at_its_last_step() -> None:
    method = build_method("dae", **TINY)
    optimizer = method.configure_optimizer(1e-3)
    scheduler = method.configure_lr_scheduler(optimizer, max_steps=1)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_bad_hyperparameters_are_named_and_edges_allowed() -> None:
    build_method("dae", noise_resolution=2, noise_std=0.0, lr_cosine_steps=1, **TINY)
    cases = [
        ({"noise_resolution": 1}, r"noise_resolution=1 \(expected ≥ 2\)"),
        ({"noise_std": -0.1}, r"noise_std=-0.1 \(expected ≥ 0\)"),
        ({"lr_cosine_steps": 0}, r"hyperparameter lr_cosine_steps=0, expected ≥ 1$"),
        ({"map_blur_sigma": -1.0}, r"hyperparameter map_blur_sigma=-1.0, expected ≥ 0$"),
        (
            {"norm_num_groups": 3},
            r"norm_num_groups=3 must divide every entry of channels \(8, 16, 16\)",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            build_method("dae", **(TINY | extra))
