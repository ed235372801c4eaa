"""Wolleb et al. (MICCAI 2022; JuliaWolleb/diffusion-anomaly, its run scripts): the
hyperparameters are the reference's by default, recorded as given, and reach the UNet, the
classifier, the EMA, the optimiser and the schedule; bad values are named."""

from __future__ import annotations

import numpy as np
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


def test_networks_are_built_as_the_reference_builds_them() -> None:
    """script_util.py: a class-conditional UNet over the 2 classes (healthy, lesion); the
    classifier with residual down-sampling blocks and ``classifier_num_head_channels``
    channels per attention head."""
    from monai.networks.blocks import SABlock
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    method = build_method("wolleb", **WOLLEB_TINY | {"classifier_num_head_channels": 4})
    assert method.unet.class_embedding.num_embeddings == 2
    heads = [m.num_heads for m in method.classifier.modules() if isinstance(m, SABlock)]
    assert heads == [16 // 4]  # attention at the second level only, 16 channels
    downsamplers = [block.downsampler for block in method.classifier.down_blocks]
    assert all(isinstance(d, DiffusionUNetResnetBlock) for d in downsamplers)
    with pytest.raises(InputError, match=r"classifier_attention_levels \(True,\) must have"):
        build_method("wolleb", **WOLLEB_TINY | {"classifier_attention_levels": (True,)})


class Recorder(torch.nn.Module):
    """A stand-in network: a plain function of its inputs that records its calls."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function
        self.calls: list[tuple] = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.detach().clone(), t.clone(), class_labels))
        return self.function(x, t, class_labels)


def test_objective_by_hand() -> None:
    """Both stages: x0 = 2·image − 1, t ~ U{0 … T−1} per sample, x_t = √ᾱ_t x0 +
    √(1−ᾱ_t) ε; the UNet (given the slice labels) regresses ε with the MSE, the classifier
    learns the labels with cross-entropy (classifier_train.py); training_loss is the UNet's."""
    n_timesteps = 50
    method = build_method(
        "wolleb", **WOLLEB_TINY | {"num_train_timesteps": n_timesteps, "noise_level": 20}
    )
    method.unet = Recorder(
        lambda x, t, y: 0.5 * x + 0.01 * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)
    )
    method.classifier = Recorder(lambda x, t, y=None: torch.stack([x.mean((1, 2, 3)), t / 10], 1))
    images = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    batch = {"image": images, "label": labels}
    alphas = method.scheduler.alphas_cumprod.double()

    def draws(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        t = torch.randint(0, n_timesteps, (4,))
        return t, torch.randn(4, 1, 6, 6)

    def noised(t, noise):
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * (2 * images.double() - 1) + (1 - a).sqrt() * noise.double()

    t, noise = draws(7)
    torch.manual_seed(7)
    loss = method.stage_loss("model", batch)
    x_t, seen_t, seen_labels = method.unet.calls[-1]
    assert torch.equal(seen_t, t) and torch.equal(seen_labels, labels)
    torch.testing.assert_close(x_t.double(), noised(t, noise), rtol=0, atol=1e-6)
    predicted = 0.5 * x_t + 0.01 * t.view(-1, 1, 1, 1) + labels.view(-1, 1, 1, 1)
    torch.testing.assert_close(loss, ((predicted - noise) ** 2).mean())

    torch.manual_seed(7)
    torch.testing.assert_close(method.training_loss(batch), loss)

    t, noise = draws(8)
    torch.manual_seed(8)
    loss = method.stage_loss("classifier", batch)
    x_t, seen_t, _ = method.classifier.calls[-1]
    assert torch.equal(seen_t, t)
    torch.testing.assert_close(x_t.double(), noised(t, noise), rtol=0, atol=1e-6)
    logits = torch.stack([x_t.mean((1, 2, 3)), t / 10], 1)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    # the draws cover the whole range over many batches, t = 0 included
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        method.stage_loss("model", batch)
        seen |= set(method.unet.calls[-1][1].tolist())
    assert min(seen) == 0 and max(seen) == n_timesteps - 1
    with pytest.raises(InputError, match=r"method 'wolleb': no loss for stage 'encoder'"):
        method.stage_loss("encoder", batch)


def test_scoring_chain_against_a_float64_transcription() -> None:
    """Encode with y = 0 over the grid (a_0 = 1), decode backwards with
    ε̂ = ε − √(1−a_k) · s · ∇ log p(y = 0 | x_k), both with the clipped-ε re-derivation,
    then map Σ_c |x − x̂| and the reconstruction x̂ in [0, 1] — written out in numpy."""
    n_timesteps, level, steps, scale = 100, 40, 4, 2.0
    method = build_method(
        "wolleb",
        **WOLLEB_TINY
        | {
            "num_train_timesteps": n_timesteps,
            "noise_level": level,
            "ddim_steps": steps,
            "guidance_scale": scale,
        },
    )
    weights = torch.linspace(-1, 1, 2 * 3 * 3).view(1, 2, 3, 3)

    def epsilon(x, t, y):
        return 1.5 * x - 0.004 * t.view(-1, 1, 1, 1) + 0.3

    def logits(x, t):  # log p(healthy) = −softplus(s), s = Σ w x + t / 100
        s = (weights * x).sum((1, 2, 3)) + t / 100
        return torch.stack([torch.zeros_like(s), s], 1)

    method.unet = Recorder(epsilon)
    method.classifier = Recorder(lambda x, t, y=None: logits(x, t))
    images = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(2))

    alphas = method.scheduler.alphas_cumprod.double().numpy()
    grid = [round(k * level / steps) for k in range(steps + 1)]
    a = [1.0] + [float(alphas[t]) for t in grid[1:]]
    w = weights.double().numpy()

    def clipped(x, eps, alpha):
        if alpha >= 1:
            return eps
        x0 = np.clip((x - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha), -1, 1)
        return (x - np.sqrt(alpha) * x0) / np.sqrt(1 - alpha)

    def move(x, eps, alpha, alpha_to):
        x0 = (x - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha)
        return np.sqrt(alpha_to) * x0 + np.sqrt(1 - alpha_to) * eps

    def eps_np(x, t):
        return 1.5 * x - 0.004 * t + 0.3

    x = images.double().numpy() * 2 - 1
    for k in range(steps):
        x = move(x, clipped(x, eps_np(x, grid[k]), a[k]), a[k], a[k + 1])
    for k in range(steps, 0, -1):
        eps = clipped(x, eps_np(x, grid[k]), a[k])
        s = (w * x).sum((1, 2, 3)) + grid[k] / 100
        gradient = -(1 / (1 + np.exp(-s)))[:, None, None, None] * w
        eps = eps - np.sqrt(1 - a[k]) * scale * gradient
        x = move(x, eps, a[k], a[k - 1])
    reconstruction = (x + 1) / 2
    expected_map = np.abs(images.double().numpy() - reconstruction).sum(1)

    out = method.score(images, torch.ones(3, 1, 3, 3))
    np.testing.assert_allclose(out.reconstruction.numpy(), reconstruction, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected_map, rtol=0, atol=1e-5)
    assert out.anomaly_map.shape == (3, 3, 3)
    timesteps = [int(t[0]) for _, t, _ in method.unet.calls]
    assert timesteps == grid[:-1] + grid[:0:-1]
    assert all(torch.equal(y, torch.zeros(3, dtype=torch.long)) for *_, y in method.unet.calls)
    assert [int(t[0]) for _, t, _ in method.classifier.calls] == grid[:0:-1]
