"""DDPM (Behrendt et al., MIDL 2023) against its definition, with the UNet replaced by a
recording stand-in so that each test takes milliseconds:

- training: x0 = 2x − 1 (images in [0, 1] to [-1, 1]); t ~ U{0, …, T−1}; noise ε;
  x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε with the cosine schedule of Nichol & Dhariwal
  (ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008, β clipped at 0.999);
  the network predicts x0; loss L1 (or L2) between x̂0 and x0 over the image (or the brain);
- scoring: x_t at the paper's 1-based ``test_timestep`` (scheduler index test_timestep − 1),
  noise from a generator seeded with ``score_seed``, one x0 prediction mapped back with
  (x̂0 + 1) / 2, anomaly map |x − x̂0| averaged over channels.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_hparams import DDPM_TINY

from brainuad.errors import InputError
from brainuad.methods.ddpm import DDPM
from brainuad.noise import build_noise

TINY = DDPM_TINY  # the UNet at 32 px, a few thousand parameters


class _RecordingNet(torch.nn.Module):
    """Stands in for the UNet: records (x_t, t) and predicts x̂0 = 0.5 x_t − 0.25."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy, timesteps):
        self.calls.append((noisy.detach().clone(), timesteps.clone()))
        return 0.5 * noisy - 0.25


def _ddpm(**hparams) -> DDPM:
    method = DDPM(**{**TINY, "test_timestep": 1, **hparams})
    method.unet = _RecordingNet()
    return method


def _cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_1 … ᾱ_T of the cosine schedule (index t − 1), from its definition in float64."""

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    out, alpha_bar = [], 1.0
    for t in range(1, steps + 1):
        alpha_bar *= 1 - min(1 - f(t) / f(t - 1), 0.999)
        out.append(alpha_bar)
    return torch.tensor(out, dtype=torch.float64)


def _q_sample(x0, eps, index, steps):
    alpha_bar = _cosine_alpha_bar(steps)[index].float().view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def _batch(b=3, c=1, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(b, c, size, size, generator=generator)
    mask = (torch.rand(b, 1, size, size, generator=generator) > 0.3).float()
    return {"image": image, "brainmask": mask}


def test_paper_hyperparameters_are_the_defaults():
    method = DDPM()  # the paper's UNet: 34 M parameters, built in a fraction of a second
    assert method.hparams == {
        "in_channels": 1,
        "channels": (128, 256, 256),
        "attention_levels": (False, False, False),
        "num_res_blocks": 3,
        "num_head_channels": 64,
        "norm_num_groups": 32,
        "resblock_updown": True,
        "num_train_timesteps": 1000,
        "schedule": "cosine",
        "test_timestep": 500,
        "noise": "simplex",
        "noise_settings": {},
        "loss": "l1",
        "loss_region": "image",
        "score_seed": 0,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    unet = method.unet
    assert (unet.in_channels, unet.out_channels, unet.block_out_channels) == (1, 1, (128, 256, 256))
    assert unet.num_res_blocks == (3, 3, 3) and method.scheduler.num_train_timesteps == 1000
    assert isinstance(method.configure_optimizer(1e-4), torch.optim.Adam)
    assert (DDPM.default_learning_rate, DDPM.default_batch_size) == (1e-4, 32)
    assert DDPM.scoring_hparams == {"test_timestep", "score_seed"}
    assert DDPM.supervision == "healthy" and DDPM.has_reconstruction


def test_hyperparameters_are_recorded_and_checked():
    method = DDPM(**TINY, in_channels=2, noise="gaussian", test_timestep=7, weight_decay=1)
    assert method.hparams == {
        "in_channels": 2,
        "channels": (8, 16),
        "attention_levels": (False, False),
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "resblock_updown": True,
        "num_train_timesteps": 1000,
        "schedule": "cosine",
        "test_timestep": 7,
        "noise": "gaussian",
        "noise_settings": {},
        "loss": "l1",
        "loss_region": "image",
        "score_seed": 0,
        "optimizer": "adam",
        "weight_decay": 1.0,
    }
    assert isinstance(method.hparams["weight_decay"], float)
    assert method.unet.in_channels == 2 and method.unet.out_channels == 2
    assert method.unet.block_out_channels == (8, 16)
    assert method.scheduler.num_train_timesteps == 1000
    assert DDPM(**TINY, num_train_timesteps=10, test_timestep=10).hparams["test_timestep"] == 10
    # down- and upsampling by residual blocks (the paper's resblock_updown) or plain layers
    for updown, down, up in [
        (True, "DiffusionUNetResnetBlock", "DiffusionUNetResnetBlock"),
        (False, "DiffusionUnetDownsample", "WrappedUpsample"),
    ]:
        unet = DDPM(**TINY, resblock_updown=updown).unet
        assert type(unet.down_blocks[0].downsampler).__name__ == down
        assert type(unet.up_blocks[0].upsampler).__name__ == up
    attention = DDPM(**{**TINY, "attention_levels": [0, 1]})
    assert attention.hparams["attention_levels"] == (False, True)
    adamw = DDPM(**TINY, optimizer="adamw", weight_decay=0.1).configure_optimizer(1e-4)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.1
    for bad, match in [
        ({"test_timestep": 0}, r"test_timestep=0, expected 1 … num_train_timesteps \(1000\)"),
        ({"test_timestep": 11, "num_train_timesteps": 10}, r"test_timestep=11"),
        ({"noise": "pink"}, r"hyperparameter noise='pink'"),
        ({"loss": "l3"}, r"hyperparameter loss='l3'"),
        ({"loss_region": "skull"}, r"hyperparameter loss_region='skull'"),
        ({"optimizer": "sgd"}, r"hyperparameter optimizer='sgd'"),
    ]:
        with pytest.raises(InputError, match=match):
            DDPM(**TINY, **bad)


def test_noise_is_the_configured_kind_with_the_reference_settings():
    simplex = DDPM(**TINY).noise
    assert simplex.settings() == {
        "kind": "simplex",
        "octaves": 6,
        "persistence": 0.8,
        "frequency": 64.0,
        "normalise": False,
    }
    custom = DDPM(**TINY, noise="simplex_3d", noise_settings={"octaves": 2, "normalise": True})
    assert custom.noise.settings() | {"kind": "simplex_3d"} == custom.noise.settings()
    assert (custom.noise.octaves, custom.noise.normalise) == (2, True)
    assert custom.hparams["noise_settings"] == {"octaves": 2, "normalise": True}
    assert DDPM(**TINY, noise="gaussian").noise.settings() == {"kind": "gaussian"}


def test_schedule_is_the_cosine_one():
    steps = 50
    alpha_bar = DDPM(**TINY, num_train_timesteps=steps, test_timestep=1).scheduler.alphas_cumprod
    torch.testing.assert_close(alpha_bar.double(), _cosine_alpha_bar(steps), atol=1e-6, rtol=1e-5)
    linear = DDPM(**TINY, num_train_timesteps=steps, test_timestep=1, schedule="linear_beta")
    linear = linear.scheduler
    assert not torch.allclose(linear.alphas_cumprod.double(), _cosine_alpha_bar(steps))


@pytest.mark.parametrize(
    ("loss", "region"), [("l1", "image"), ("l2", "image"), ("l1", "brain"), ("l2", "brain")]
)
def test_training_loss_is_the_x0_objective(loss, region):
    steps = 50
    method = _ddpm(noise="gaussian", num_train_timesteps=steps, loss=loss, loss_region=region)
    batch = _batch()
    torch.manual_seed(5)
    value = method.training_loss(batch)
    # the draws, in order: t ~ U{0, …, T−1} per slice, then ε ~ N(0, 1)
    torch.manual_seed(5)
    t = torch.randint(0, steps, (3,))
    eps = torch.randn(3, 1, 16, 16)
    x0 = batch["image"] * 2 - 1
    (noisy, seen_t), *more = method.unet.calls
    assert not more and seen_t.dtype == torch.long
    assert torch.equal(seen_t, t)
    torch.testing.assert_close(noisy, _q_sample(x0, eps, t, steps), atol=1e-5, rtol=1e-5)
    error = (0.5 * noisy - 0.25) - x0  # the prediction against x0 (not ε, not x in [0, 1])
    error = error.abs() if loss == "l1" else error.square()
    mask = batch["brainmask"]
    expected = error.mean() if region == "image" else (error * mask).sum() / mask.sum()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_training_timesteps_cover_zero_to_t_minus_one():
    method = _ddpm(noise="gaussian", num_train_timesteps=4)
    torch.manual_seed(0)
    method.training_loss(_batch(b=64, size=8))
    (_, t), *_ = method.unet.calls
    assert set(t.tolist()) == {0, 1, 2, 3}


def test_training_noise_follows_the_timesteps():
    """The noise is drawn for the sampled t (simplex_3d depends on it), after t."""
    settings = {"octaves": 1, "frequency": 4.0}
    method = _ddpm(noise="simplex_3d", noise_settings=settings, num_train_timesteps=20)
    batch = _batch(b=2, size=8)
    torch.manual_seed(3)
    method.training_loss(batch)
    torch.manual_seed(3)
    t = torch.randint(0, 20, (2,))
    eps = build_noise("simplex_3d", **settings)((2, 1, 8, 8), t, dtype=torch.float32)
    (noisy, _), *_ = method.unet.calls
    expected = _q_sample(batch["image"] * 2 - 1, eps, t, 20)
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("noise", ["gaussian", "simplex_3d"])
def test_scoring_is_one_x0_prediction_at_the_test_timestep(noise):
    steps, test_timestep = 50, 20
    settings = {} if noise == "gaussian" else {"octaves": 1, "frequency": 4.0}
    method = _ddpm(
        in_channels=2,
        noise=noise,
        noise_settings=settings,
        num_train_timesteps=steps,
        test_timestep=test_timestep,
        score_seed=7,
    )
    images = _batch(b=3, c=2, size=8)["image"]
    out = method.score(images, torch.ones(3, 1, 8, 8))
    (noisy, t), *more = method.unet.calls
    assert not more  # one step, no reverse chain
    assert t.tolist() == [test_timestep - 1] * 3  # 1-based test_timestep, 0-based index
    generator = torch.Generator().manual_seed(7)
    index = torch.full((3,), test_timestep - 1)
    eps = build_noise(noise, **settings)((3, 2, 8, 8), index, generator=generator)
    expected = _q_sample(images * 2 - 1, eps, index, steps)
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=1e-5)
    reconstruction = (0.5 * noisy - 0.25 + 1) / 2
    torch.testing.assert_close(out.reconstruction, reconstruction)
    torch.testing.assert_close(out.anomaly_map, (images - reconstruction).abs().mean(dim=1))


def test_scoring_noise_comes_from_the_score_seed():
    images, mask = _batch(b=2, size=8)["image"], torch.ones(2, 1, 8, 8)
    first = _ddpm(noise="gaussian", score_seed=1)
    first.score(images, mask)
    torch.manual_seed(123)  # the global RNG plays no part
    again = _ddpm(noise="gaussian", score_seed=1)
    again.score(images, mask)
    other = _ddpm(noise="gaussian", score_seed=2)
    other.score(images, mask)
    assert torch.equal(first.unet.calls[0][0], again.unet.calls[0][0])
    assert not torch.equal(first.unet.calls[0][0], other.unet.calls[0][0])


def test_the_real_unet_maps_x_t_and_t_to_an_image():
    method = DDPM(**TINY, in_channels=2)
    with torch.no_grad():  # MONAI zero-initialises the output layer
        for parameter in method.parameters():
            parameter.normal_(std=0.2)
    noisy = torch.randn(2, 2, 16, 16)
    out = method(noisy, torch.tensor([0, 999]))
    assert out.shape == (2, 2, 16, 16)
    assert torch.equal(out, method.unet(noisy, torch.tensor([0, 999])))
    assert not torch.equal(out[0], method(noisy, torch.tensor([500, 999]))[0])
