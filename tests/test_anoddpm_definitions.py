"""AnoDDPM (Wyatt et al., CVPRW 2022; Julian-Wyatt/AnoDDPM ``GaussianDiffusion.py``) by its
definition, written out in float64 numpy independently of the implementation: the linear β
schedule scaled by 1000 / T, the ε objective on t < train_max_timestep, and the scoring chain
(noise to λ − 1, then x̂0 from the clamped x_t, the posterior mean, fixed-large variance and
fresh noise at every step but the last; respaced steps with β' = 1 − ᾱ_s / ᾱ_s')."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hparams import ANODDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method


class Function(torch.nn.Module):
    """A plain function standing in for a submodule."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args):
        return self.function(*args)


def linear_alphas_cumprod(n_timesteps: int) -> np.ndarray:
    scale = 1000 / n_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, n_timesteps)
    return np.cumprod(1 - betas)


def fake_epsilon(x: np.ndarray, t: int) -> np.ndarray:
    return 0.3 * x + 0.002 * t - 0.1


def fake_noise(shape, t: int) -> np.ndarray:
    grid = np.arange(np.prod(shape)).reshape(shape)
    return np.sin(grid * 0.7 + t)


def chain_by_hand(images: np.ndarray, visited: list[int], abar: np.ndarray, clamp: str):
    x0 = images * 2 - 1
    start = visited[0]
    x = np.sqrt(abar[start]) * x0 + np.sqrt(1 - abar[start]) * fake_noise(x0.shape, start)
    for i, t in enumerate(visited):
        epsilon = fake_epsilon(x, t)
        source = np.clip(x, -1, 1) if clamp == "x_t" else x
        x0_hat = (source - np.sqrt(1 - abar[t]) * epsilon) / np.sqrt(abar[t])
        if clamp == "x0":
            x0_hat = np.clip(x0_hat, -1, 1)
        if i == len(visited) - 1:
            x = x0_hat
            break
        prev = abar[visited[i + 1]]
        beta = 1 - abar[t] / prev
        mean = (
            beta * np.sqrt(prev) / (1 - abar[t]) * x0_hat
            + (1 - prev) * np.sqrt(1 - beta) / (1 - abar[t]) * x
        )
        x = mean + np.sqrt(beta) * fake_noise(x0.shape, t)
    reconstruction = (x + 1) / 2
    return ((images - reconstruction) ** 2).mean(axis=1), reconstruction


@pytest.mark.parametrize(
    ("settings", "visited"),
    [
        ({"test_timestep": 6}, [5, 4, 3, 2, 1, 0]),
        ({"test_timestep": 6, "clamp": "x0"}, [5, 4, 3, 2, 1, 0]),
        ({"test_timestep": 10, "reverse_steps": 4}, [9, 6, 3, 0]),
        (
            {
                "test_timestep": 10,
                "reverse_steps": 3,
                "num_train_timesteps": 500,
                "train_max_timestep": 400,
            },
            [9, 4, 0],
        ),
    ],
)
def test_scoring_chain_by_hand(monkeypatch, settings: dict, visited: list[int]) -> None:
    method = build_method("anoddpm", **ANODDPM_TINY | settings)
    assert method.reverse_timesteps() == visited
    seen = []

    def epsilon(x, t):
        seen.append(int(t[0]))
        assert (t == t[0]).all() and t.dtype == torch.long
        return torch.from_numpy(fake_epsilon(x.double().numpy(), int(t[0]))).float()

    def noise(like, timesteps, generator):
        assert generator is not None  # scoring is seeded
        return torch.from_numpy(fake_noise(tuple(like.shape), int(timesteps[0]))).float()

    monkeypatch.setattr(method, "ema", Function(epsilon))
    monkeypatch.setattr(method, "_draw_noise", noise)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 16, 16, generator=generator)
    out = method.score(images, torch.ones(2, 1, 16, 16))
    assert seen == visited  # one ε evaluation per visited step, λ − 1 first
    abar = linear_alphas_cumprod(settings.get("num_train_timesteps", 1000))
    expected_map, expected_rec = chain_by_hand(
        images.double().numpy(), visited, abar, settings.get("clamp", "x_t")
    )
    np.testing.assert_allclose(out.reconstruction.numpy(), expected_rec, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected_map, rtol=1e-4, atol=1e-5)


def test_schedule_is_the_references_linear_betas_scaled_to_t() -> None:
    for n_timesteps in (1000, 250):
        settings = {"num_train_timesteps": n_timesteps, "train_max_timestep": n_timesteps}
        method = build_method("anoddpm", **ANODDPM_TINY | settings)
        np.testing.assert_allclose(
            method.scheduler.alphas_cumprod.double().numpy(),
            linear_alphas_cumprod(n_timesteps),
            rtol=1e-5,
        )


@pytest.mark.parametrize("noise", ["gaussian", "simplex_3d"])
def test_training_objective_by_hand(monkeypatch, noise: str) -> None:
    method = build_method("anoddpm", **ANODDPM_TINY | {"noise": noise, "train_max_timestep": 7})
    with torch.no_grad():  # MONAI zero-initialises the output layer: ε̂ = 0 whatever the input
        generator = torch.Generator().manual_seed(5)
        for parameter in method.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    images = torch.rand(4, 1, 16, 16)
    timesteps = []
    unet = method.unet
    recorder = Function(lambda x, t: timesteps.append(t.clone()) or unet(x, t))
    monkeypatch.setattr(method, "unet", recorder)
    torch.manual_seed(3)
    loss = method.training_loss({"image": images, "brainmask": torch.ones_like(images)})
    torch.manual_seed(3)
    x0 = images * 2 - 1
    t = torch.randint(0, 7, (4,))
    epsilon = method._draw_noise(x0, t, None)
    abar = method.scheduler.alphas_cumprod[t][:, None, None, None]
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * epsilon
    with torch.no_grad():
        expected = ((unet(noisy, t) - epsilon) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.equal(timesteps[0], t) and int(t.max()) < 7


def test_only_the_trained_unet_is_optimised_and_clipping_zero_is_none() -> None:
    method = build_method("anoddpm", **ANODDPM_TINY | {"gradient_clip_norm": 0})
    assert method.hparams["gradient_clip_norm"] is None
    trained = {id(p) for p in method.stage_parameters("model")}
    assert trained == {id(p) for p in method.unet.parameters()}
    assert not trained & {id(p) for p in method.ema.parameters()}
    optimizer = method.configure_optimizer(1e-4)
    assert type(optimizer) is torch.optim.AdamW  # the reference's


def test_hyperparameter_edges_and_messages() -> None:
    t = 50
    base = ANODDPM_TINY | {"num_train_timesteps": t, "train_max_timestep": t}
    for edge in (
        {"train_max_timestep": t},
        {"train_max_timestep": 1},
        {"test_timestep": t},
        {"test_timestep": 1},
        {"test_timestep": 5, "reverse_steps": 5},
        {"test_timestep": 5, "reverse_steps": 2},
    ):
        build_method("anoddpm", **base | edge)
    cases = [
        (
            {"train_max_timestep": 0},
            r"train_max_timestep=0, expected 1 … num_train_timesteps \(50\)",
        ),
        ({"train_max_timestep": t + 1}, r"train_max_timestep=51, expected 1"),
        ({"test_timestep": 0}, r"test_timestep=0, expected 1 … num_train_timesteps \(50\)"),
        ({"test_timestep": t + 1}, r"test_timestep=51, expected 1"),
        ({"test_timestep": 5, "reverse_steps": 1}, r"reverse_steps=1, expected None .* \(5\)"),
        ({"test_timestep": 5, "reverse_steps": 6}, r"reverse_steps=6, expected None"),
        ({"num_heads": 0}, r"num_heads=0 must be ≥ 1 and divide every entry of channels \(8, 16\)"),
        ({"num_heads": 3}, r"num_heads=3 must be ≥ 1 and divide"),
        ({"clamp": "none"}, r"\bclamp\b"),
        ({"noise": "pink"}, r"\bnoise\b"),
        ({"optimizer": "sgd"}, r"\boptimizer\b"),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            build_method("anoddpm", **base | extra)


def unet_size(method) -> int:
    return sum(p.numel() for p in method.unet.parameters())


def test_hyperparameters_are_recorded_and_reach_the_parts() -> None:
    assert build_method("anoddpm").hparams == {
        "in_channels": 1,
        "channels": (128, 128, 256, 384, 512),
        "attention_levels": (False, False, False, True, True),
        "num_res_blocks": 2,
        "num_heads": 2,
        "norm_num_groups": 32,
        "resblock_updown": True,
        "num_train_timesteps": 1000,
        "train_max_timestep": 800,
        "test_timestep": 250,
        "reverse_steps": None,
        "noise": "simplex_3d",
        "noise_settings": {},
        "clamp": "x_t",
        "ema_decay": 0.9999,
        "gradient_clip_norm": 1.0,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "score_seed": 0,
    }
    settings = {
        "in_channels": 2,
        "channels": (8, 16),
        "attention_levels": (False, True),
        "num_res_blocks": 2,
        "num_heads": 2,
        "norm_num_groups": 4,
        "resblock_updown": False,
        "num_train_timesteps": 300,
        "train_max_timestep": 200,
        "test_timestep": 20,
        "reverse_steps": 5,
        "noise": "simplex",
        "noise_settings": {"octaves": 2},
        "clamp": "x0",
        "ema_decay": 0.9,
        "gradient_clip_norm": 0.5,
        "optimizer": "adam",
        "weight_decay": 0.01,
        "score_seed": 4,
    }
    method = build_method("anoddpm", **settings)
    assert method.hparams == settings
    assert method.noise.settings()["kind"] == "simplex"
    assert method.noise.settings()["octaves"] == 2
    assert method.ema.decay == 0.9
    assert type(method.configure_optimizer(1e-4)) is torch.optim.Adam
    assert method.scheduler.num_train_timesteps == 300
    assert method.scheduler.prediction_type == "epsilon"
    # BigGAN-style residual up/down-sampling adds the resampling residual blocks' weights
    with_resblocks = build_method("anoddpm", **settings | {"resblock_updown": True})
    assert unet_size(with_resblocks) > unet_size(method)
    assert method.hparams["resblock_updown"] is False
    with pytest.raises(InputError, match=r"\bnoise\b"):
        build_method("anoddpm", **ANODDPM_TINY | {"noise": "SIMPLEX"})
    build_method("anoddpm", **ANODDPM_TINY | {"noise": "simplex", "optimizer": "adam"})
