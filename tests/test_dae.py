"""What makes the DAE itself: coarse, shifted, foreground-only noise; masked loss; AMSGrad
with cosine annealing; the residual map (the shared contract is in test_methods.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.dae import coarse_noise, foreground_mask


def disc_images(b: int = 4, c: int = 1, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2).float()
    return (0.3 + 0.5 * torch.rand(b, c, size, size)) * disc


def find_shift(pattern: torch.Tensor, step: int) -> list[tuple[int, int]]:
    """Shifts (dy, dx) under which ``pattern`` [H, W] is bilinear between grid points
    ``step`` apart: every pixel between two grid points is their linear interpolation."""
    size = pattern.shape[-1]
    found = []
    for dy in range(size):
        for dx in range(size):
            u = torch.roll(pattern, shifts=(-dy, -dx), dims=(0, 1))
            grid = u[::step, ::step]
            # Halfway points along rows and columns (step 2: the odd pixels).
            rows = u[step // 2 :: step, ::step]
            cols = u[::step, step // 2 :: step]
            if torch.allclose(rows, (grid[:-1] + grid[1:]) / 2, atol=1e-6) and torch.allclose(
                cols, (grid[:, :-1] + grid[:, 1:]) / 2, atol=1e-6
            ):
                found.append((dy, dx))
    return found


def test_noise_is_coarse_bilinear_and_shifted_once_per_batch():
    # 31 px with a 16-point grid and aligned corners: grid point j sits on pixel 2j, and
    # the odd pixels are the means of their neighbours.
    images = torch.ones(6, 2, 31, 31)
    torch.manual_seed(0)
    noise = coarse_noise(images, resolution=16, std=0.2)
    shifts = find_shift(noise[0, 0], step=2)
    assert len(shifts) == 1
    dy, dx = shifts[0]
    for b in range(6):
        for c in range(2):
            assert find_shift(noise[b, c], step=2) == shifts  # one shift for the batch
    grid = torch.roll(noise, shifts=(-dy, -dx), dims=(2, 3))[:, :, ::2, ::2]
    assert grid.shape[-2:] == (16, 16)
    # The grid values are the N(0, 0.2²) draws: independent per sample and channel.
    assert grid.std().item() == pytest.approx(0.2, rel=0.1)
    assert abs(grid.mean().item()) < 0.03
    assert not torch.allclose(grid[0, 0], grid[0, 1])
    assert not torch.allclose(grid[0, 0], grid[1, 0])
    # Successive batches are shifted differently (with overwhelming probability).
    later = [find_shift(coarse_noise(images)[0, 0], 2)[0] for _ in range(3)]
    assert len({*later, (dy, dx)}) > 1


def test_noise_only_where_the_image_is_non_zero():
    images = disc_images()
    method = build_method("dae", **TINY_HPARAMS["dae"])
    torch.manual_seed(1)
    noisy = method.add_noise(images)
    outside = foreground_mask(images).expand_as(images) == 0
    assert outside.any()
    assert torch.equal(noisy[outside], images[outside])
    assert (noisy[~outside] != images[~outside]).float().mean() > 0.99


def test_noise_std_hyperparameter():
    images = torch.ones(32, 1, 31, 31)
    torch.manual_seed(2)
    small = coarse_noise(images, std=0.05)
    torch.manual_seed(2)
    large = coarse_noise(images, std=0.2)
    torch.testing.assert_close(large, 4 * small)


class Fixed(torch.nn.Module):
    """A stand-in network that returns a fixed function of the clean image."""

    def __init__(self, clean: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.output = clean + offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


def test_loss_is_masked_squared_error_over_all_pixels(monkeypatch):
    images = disc_images()
    fg = foreground_mask(images)
    method = build_method("dae", **TINY_HPARAMS["dae"])
    batch = {"image": images, "brainmask": fg}
    # Errors outside the foreground do not count...
    method.network = Fixed(images, 5.0 * (1 - fg))
    assert method.training_loss(batch).item() == 0.0
    # ...and inside they are averaged over every pixel, not over the foreground only.
    method.network = Fixed(images, 0.5 * fg)
    expected = 0.25 * fg.mean().item()
    assert method.training_loss(batch).item() == pytest.approx(expected, rel=1e-6)


def test_amsgrad_and_cosine_schedule():
    method = build_method("dae", **TINY_HPARAMS["dae"])
    optimizer = method.configure_optimizer(1e-4)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["amsgrad"] is True
    assert optimizer.param_groups[0]["weight_decay"] == 1e-5
    scheduler = method.configure_lr_scheduler(optimizer, max_steps=10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.5e-4)  # half-way: half the rate
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # annealed to 0 over the run
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    # An explicit period (the reference's T_max) anneals sooner.
    periodic = build_method("dae", **TINY_HPARAMS["dae"], lr_cosine_steps=4)
    optimizer = periodic.configure_optimizer(1e-4)
    scheduler = periodic.configure_lr_scheduler(optimizer, max_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_base_method_has_no_scheduler():
    ae = build_method("ae", **TINY_HPARAMS["ae"])
    assert ae.configure_lr_scheduler(ae.configure_optimizer(1e-4), 10) is None


def test_map_is_channel_mean_residual_and_blur_is_scoring_only():
    images = disc_images(c=2)
    mask = foreground_mask(images)
    method = build_method("dae", **TINY_HPARAMS["dae"], in_channels=2)
    out = method.score(images, mask)
    torch.testing.assert_close(out.anomaly_map, (images - out.reconstruction).abs().mean(dim=1))
    blurred = build_method("dae", **TINY_HPARAMS["dae"], in_channels=2, map_blur_sigma=2.0)
    blurred.load_state_dict(method.state_dict())
    smooth = blurred.score(images, mask).anomaly_map
    assert smooth.diff(dim=-1).abs().mean() < 0.5 * out.anomaly_map.diff(dim=-1).abs().mean()
    assert "map_blur_sigma" in method.scoring_hparams


def test_bad_hyperparameters():
    with pytest.raises(InputError, match="norm_num_groups"):
        build_method("dae", channels=(8, 16, 24), norm_num_groups=16)
    with pytest.raises(InputError, match="levels"):
        build_method("dae", channels=(8, 16), norm_num_groups=4)
