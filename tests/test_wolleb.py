"""What makes `wolleb` itself: the label convention (y = 0 healthy), classifier guidance
toward healthy, exact pairing of DDIM encoding and decoding, and its two stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_methods import train_every_stage, write_cohorts
from tiny_config import tiny_config_with_seed_methods
from tiny_hparams import TINY_HPARAMS

from brainuad.bench.steps import step_seconds
from brainuad.errors import InputError
from brainuad.io.torchfile import load_torch
from brainuad.methods import Method, build_method
from brainuad.methods.wolleb import HEALTHY, LESION, ddim_grid


def tiny(**overrides) -> Method:
    torch.manual_seed(0)
    return build_method("wolleb", **{**TINY_HPARAMS["wolleb"], **overrides})


class GaussianEpsilon(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] when x0 ~ N(0, σ² I): a stand-in for a perfectly
    trained UNet, under which the DDIM chain is the discretised probability-flow ODE."""

    def __init__(self, alphas_cumprod: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.sigma = sigma
        self.class_labels: list[torch.Tensor] = []

    def forward(self, x, timesteps, class_labels=None):
        self.class_labels.append(class_labels)
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.sigma**2 + 1 - a)


class BrightnessClassifier(torch.nn.Module):
    """Logits (healthy 0, lesion ∝ mean intensity in ``region``): bright there = lesion."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x, timesteps):
        lesion = 4 * (x * self.region).sum(dim=(1, 2, 3)) / self.region.sum()
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def with_analytic_networks(method: Method, sigma: float = 0.5, region=None) -> Method:
    method.unet = GaussianEpsilon(method.scheduler.alphas_cumprod, sigma)
    if region is not None:
        method.classifier = BrightnessClassifier(region)
    return method


def test_ddim_grid_pairs_both_ends_and_sizes_are_checked():
    assert ddim_grid(500, 500) == list(range(501))
    assert ddim_grid(500, 4) == [0, 125, 250, 375, 500]
    assert ddim_grid(7, 3) == [0, 2, 5, 7]
    with pytest.raises(InputError, match="ddim_steps"):
        ddim_grid(10, 11)
    with pytest.raises(InputError, match="noise_level"):
        build_method("wolleb", **{**TINY_HPARAMS["wolleb"], "noise_level": 1000})
    with pytest.raises(InputError, match="image_size=30 must be divisible by 4"):
        build_method("wolleb", **{**TINY_HPARAMS["wolleb"], "image_size": 30})


def test_classifier_gradient_moves_toward_healthy():
    """A small step along ∇ log p(y = 0 | x_t) raises p(healthy) for every slice and a step
    against it lowers it, also when called under no_grad as scoring does."""
    method = tiny().eval()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    t = torch.tensor([0, 100, 300, 600])
    with torch.no_grad():
        gradient = method.healthy_log_prob_gradient(x, t)
        step = 1e-2 / gradient.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

        def p_healthy(images):
            return F.softmax(method.classifier(images, t), dim=-1)[:, HEALTHY]

        before = p_healthy(x)
        assert (p_healthy(x + step * gradient) > before).all()
        assert (p_healthy(x - step * gradient) < before).all()
    assert gradient.shape == x.shape and not gradient.requires_grad


def test_ddim_encode_decode_reconstructs_the_input():
    """Unguided encode → decode is the probability-flow ODE there and back: with the exact
    ε of Gaussian data it returns the input, closer with more DDIM steps, and the encoding
    lands on the flow's value at ᾱ_L; with an ε that does not depend on x_t the round trip is
    exact at any step count."""
    x = (torch.rand(3, 2, 8, 8) * 2 - 1) * 0.9

    sigma = 0.5

    def round_trip(steps: int) -> tuple[torch.Tensor, float]:
        method = with_analytic_networks(tiny(ddim_steps=steps, clip_denoised=False), sigma)
        encoded = method.encode(x)
        error = float((method.decode(encoded, guidance_scale=0) - x).abs().max())
        return encoded, error

    # The reference's 500 steps of one timestep each; DDIM is first order in the step.
    (_, coarse), (encoded, fine) = round_trip(10), round_trip(500)
    assert fine < 0.01
    assert fine < coarse / 20
    # The flow of N(0, σ²) data scales x0 to the marginal's std at ᾱ_L, L = 500 exactly.
    a = tiny().scheduler.alphas_cumprod[500]
    torch.testing.assert_close(
        encoded, x * (a * sigma**2 + 1 - a).sqrt() / sigma, rtol=0.01, atol=0
    )

    method = tiny(ddim_steps=3, clip_denoised=False)
    pattern = torch.randn(1, 2, 8, 8)

    class ConstantEpsilon(torch.nn.Module):
        def forward(self, x, timesteps, class_labels=None):
            return pattern.expand_as(x)

    method.unet = ConstantEpsilon()
    torch.testing.assert_close(method.decode(method.encode(x), 0.0), x, atol=1e-5, rtol=0)


def test_guided_decoding_removes_what_the_classifier_calls_lesion():
    """With a classifier that calls a bright square 'lesion', guidance toward y = 0 darkens
    the square and leaves the rest as unguided decoding has it; the map shows the square."""
    region = torch.zeros(1, 1, 16, 16)
    region[..., 4:10, 4:10] = 1
    method = with_analytic_networks(tiny(ddim_steps=20), region=region).eval()
    x = torch.full((2, 1, 16, 16), 0.0)
    x[..., 4:10, 4:10] = 0.8
    with torch.no_grad():
        encoded = method.encode(x)
        unguided = method.decode(encoded, guidance_scale=0)
        guided = method.decode(encoded, guidance_scale=100)
    inside = region.bool().expand_as(x)
    assert guided[inside].mean() < unguided[inside].mean() - 0.2
    torch.testing.assert_close(guided[~inside], unguided[~inside], atol=0.05, rtol=0)
    maps = method.score((x + 1) / 2, torch.ones(2, 1, 16, 16)).anomaly_map
    assert maps[:, 4:10, 4:10].mean() > 5 * maps[:, 12:, 12:].mean()


def test_label_convention():
    """Slice label 1 = lesion: the UNet is trained conditioned on the slice label and scored
    conditioned on 0 (healthy); the classifier's cross-entropy targets the slice label."""
    assert (HEALTHY, LESION) == (0, 1)
    method = with_analytic_networks(tiny())
    images = torch.rand(4, 1, 32, 32)
    batch = {
        "image": images,
        "brainmask": torch.ones(4, 1, 32, 32),
        "label": torch.tensor([0, 1, 1, 0]),
    }
    # The analytic stand-in has no parameters; only the conditioning it receives matters.
    method.unet.class_labels.clear()
    method.stage_loss("model", batch)
    assert method.unet.class_labels[0].tolist() == [0, 1, 1, 0]
    method.unet.class_labels.clear()
    method.score(images, batch["brainmask"])
    assert len(method.unet.class_labels) == 2 * method.hparams["ddim_steps"]
    assert all(labels.eq(HEALTHY).all() for labels in method.unet.class_labels)

    class Confident(torch.nn.Module):
        def forward(self, x, timesteps):
            return torch.tensor([[6.0, 0.0]]).expand(x.shape[0], 2)

    method.classifier = Confident()
    healthy = method.stage_loss("classifier", {**batch, "label": torch.zeros(4).long()})
    lesion = method.stage_loss("classifier", {**batch, "label": torch.ones(4).long()})
    assert healthy < 0.01 and lesion > 5.9


def test_stages_train_their_own_network_and_model_file_holds_both(tmp_path):
    """The classifier stage trains only the classifier; the model stage starts from it,
    trains only the UNet, and model.pt holds both (scoring needs both)."""
    method = tiny()
    assert {id(p) for p in method.stage_parameters("classifier")} == {
        id(p) for p in method.classifier.parameters()
    }
    assert {id(p) for p in method.stage_parameters("model")} == {
        id(p) for p in method.unet.parameters()
    }
    files = train_every_stage("wolleb", write_cohorts(tmp_path), tmp_path, max_steps=2)
    first = load_torch(files["classifier"], "stage file")["state_dict"]
    final = load_torch(files["model"], "model file")["state_dict"]
    initial = tiny().state_dict()  # train_fold seeds 0 before building, as tiny() does
    classifier_keys = [k for k in final if k.startswith("classifier.")]
    unet_keys = [k for k in final if k.startswith("unet.")]
    assert classifier_keys and unet_keys and len(classifier_keys) + len(unet_keys) == len(final)
    for key in classifier_keys:
        assert torch.equal(final[key], first[key]), key
    assert any(not torch.equal(first[k], initial[k]) for k in classifier_keys)
    assert all(torch.equal(first[k], initial[k]) for k in unet_keys)
    assert any(not torch.equal(final[k], initial[k]) for k in unet_keys)


def test_step_benchmark_times_each_stage():
    """`python -m brainuad.bench.steps` times a step of each stage (docs/benchmarks.md)."""
    config = tiny_config_with_seed_methods()
    for stage in ("classifier", "model"):
        batch, seconds = step_seconds(config, "wolleb", 2, 1, stage)
        assert batch == 2 and seconds > 0
    with pytest.raises(InputError, match="has no stage 'pretrain'"):
        step_seconds(config, "wolleb", 2, 1, "pretrain")
