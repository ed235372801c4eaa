"""AnoDDPM: time-dependent simplex noise, EMA weights that score, the reverse chain from λ."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_training import make_run, write_slices
from tiny_hparams import ANODDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method, default_hparams
from brainuad.noise import SimplexNoise3D
from brainuad.provenance import seed_everything
from brainuad.slices.hdf5 import SliceDataset
from brainuad.training.ema import EMAWeights
from brainuad.training.loop import train


def test_defaults_are_the_references():
    hp = default_hparams("anoddpm")
    method = build_method("anoddpm", **ANODDPM_TINY)  # the tiny UNet; defaults otherwise
    assert method.noise.settings() == {
        "kind": "simplex_3d",
        "octaves": 6,
        "persistence": 0.8,
        "frequency": 64.0,
        "normalise": False,
    }
    assert (hp["num_train_timesteps"], hp["train_max_timestep"], hp["test_timestep"]) == (
        1000,
        800,
        250,
    )
    assert (hp["ema_decay"], hp["gradient_clip_norm"], hp["optimizer"]) == (0.9999, 1.0, "adamw")
    assert hp["reverse_steps"] is None and hp["clamp"] == "x_t"
    assert hp["channels"] == (128, 128, 256, 384, 512) and hp["num_heads"] == 2
    betas = method.scheduler.betas
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    assert isinstance(method.configure_optimizer(1e-4), torch.optim.AdamW)
    # The optimiser trains the UNet only, never the EMA copy.
    trained = {id(p) for p in method.stage_parameters("model")}
    assert trained == {id(p) for p in method.unet.parameters()}
    # The reference's schedule scaling for other T: β range × 1000 / T.
    short = build_method(
        "anoddpm", **{**ANODDPM_TINY, "num_train_timesteps": 100, "train_max_timestep": 80}
    )
    assert float(short.scheduler.betas[-1]) == pytest.approx(0.2)
    with pytest.raises(InputError, match="reverse_steps"):
        build_method("anoddpm", **{**ANODDPM_TINY, "reverse_steps": 1})
    with pytest.raises(InputError, match="train_max_timestep"):
        build_method("anoddpm", **{**ANODDPM_TINY, "train_max_timestep": 1001})
    with pytest.raises(InputError, match="num_heads"):
        build_method("anoddpm", **{**ANODDPM_TINY, "num_heads": 3})


def test_training_noise_is_simplex_at_z_equal_t_with_the_references_statistics(monkeypatch):
    """The loss's target is the noise added: the slice z = t of 3D simplex noise, so equal
    t share a pattern and other t differ; not unit variance (std about 0.45 at 96 px, the
    reference's); t < 800 only."""
    torch.manual_seed(0)
    method = build_method("anoddpm", **ANODDPM_TINY)
    assert isinstance(method.noise, SimplexNoise3D)
    seen = []
    add_noise = method.scheduler.add_noise

    def spy(original, noise, timesteps):
        seen.append((noise.clone(), timesteps.clone()))
        return add_noise(original, noise, timesteps)

    monkeypatch.setattr(method.scheduler, "add_noise", spy)
    stds, ts = [], []
    for _ in range(4):
        images = torch.rand(8, 1, 96, 96)
        with torch.no_grad():
            method.training_loss({"image": images, "brainmask": torch.ones(8, 1, 96, 96)})
        noise, t = seen[-1]
        ts.append(t)
        stds += [float(n.std()) for n in noise]
        for i in range(8):
            for j in range(8):
                same = torch.equal(noise[i], noise[j])
                assert same == (int(t[i]) == int(t[j]))
    assert int(torch.cat(ts).max()) < 800
    assert 0.36 < float(np.mean(stds)) < 0.56
    # The loss is the mean squared error of the predicted noise (MONAI's UNet starts with a
    # zero output layer: ε̂ = 0, so the loss is mean(ε²)).
    images = torch.rand(2, 1, 32, 32)
    torch.manual_seed(1)
    loss = method.training_loss({"image": images, "brainmask": torch.ones(2, 1, 32, 32)})
    noise, _ = seen[-1]
    assert float(loss.detach()) == pytest.approx(float(noise.square().mean()), rel=1e-5)


def _spy_network(module, output=torch.zeros_like):
    """Replace ``module.forward`` by a recorder of the timesteps returning ``output(x)``."""
    seen = []

    def fake(x, timesteps):
        seen.append(timesteps.clone())
        return output(x)

    module.forward = fake
    return seen


def test_reverse_chain_starts_at_lambda_with_fresh_noise_every_step(monkeypatch):
    """Paper: noise to λ = 250 (index 249), then 250 reverse steps 249 … 0 with the EMA
    network, a new simplex pattern at z = t in every step except the last."""
    method = build_method("anoddpm", **{**ANODDPM_TINY, "test_timestep": 250})
    evaluated = _spy_network(method.ema)
    drawn = []
    noise = method.noise

    def spy_noise(shape, timesteps, **kwargs):
        out = noise(shape, timesteps, **kwargs)
        drawn.append((timesteps.clone(), out))
        return out

    monkeypatch.setattr(method, "noise", spy_noise)
    images = torch.rand(2, 1, 32, 32)
    method.score(images, torch.ones(2, 1, 32, 32))
    assert [int(t[0]) for t in evaluated] == list(range(249, -1, -1))
    assert all(torch.equal(t, t[:1].expand(2)) for t in evaluated)
    # Forward noise at 249, then one fresh draw per reverse step 249 … 1 (none at 0).
    assert [int(t[0]) for t, _ in drawn] == [249, *range(249, 0, -1)]
    assert not torch.equal(drawn[0][1], drawn[1][1])  # same t, new pattern
    # With reverse_steps: a strided chain over the same range.
    method.hparams["reverse_steps"] = 8
    evaluated.clear()
    method.score(images, torch.ones(2, 1, 32, 32))
    steps = [int(t[0]) for t in evaluated]
    assert len(steps) == 8 and steps[0] == 249 and steps[-1] == 0
    assert steps == sorted(steps, reverse=True)


def test_respaced_chain_over_every_step_is_the_full_chain():
    """reverse_steps = λ visits every step, so its respaced β' are the β_t: same maps."""
    seed_everything(0)
    method = build_method("anoddpm", **{**ANODDPM_TINY, "test_timestep": 6})
    for p in method.ema.parameters():  # a non-trivial network: random output layer
        p.data.normal_(0, 0.05)
    images, mask = torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    full = method.score(images, mask)
    method.hparams["reverse_steps"] = 6
    respaced = method.score(images, mask)
    torch.testing.assert_close(full.anomaly_map, respaced.anomaly_map, rtol=1e-5, atol=1e-6)
    # The map is the squared error of the reconstruction.
    torch.testing.assert_close(
        full.anomaly_map, (images - full.reconstruction).square()[:, 0], rtol=0, atol=0
    )


def test_ema_follows_the_training_loop_and_is_what_scores(tmp_path):
    """One optimiser step of the shared loop with decay 0.5: EMA = (initial + trained) / 2,
    updated after the step; scores change with the EMA weights, not with the trained UNet."""
    dataset = SliceDataset(write_slices(tmp_path / "slices.h5"))
    seed_everything(7)
    method = build_method("anoddpm", **{**ANODDPM_TINY, "ema_decay": 0.5})
    initial = copy.deepcopy(method.unet.state_dict())
    train(method, dataset, None, make_run(tmp_path, max_steps=1, learning_rate=1e-2))
    changed = 0
    for name, value in method.unet.state_dict().items():
        expected = 0.5 * initial[name] + 0.5 * value
        torch.testing.assert_close(method.ema.module.state_dict()[name], expected)
        changed += not torch.equal(value, initial[name])
    assert changed > 0
    assert any(k.startswith("ema.module.") for k in method.state_dict())  # saved with it

    images, mask = torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    before = method.score(images, mask).anomaly_map
    for p in method.unet.parameters():
        p.data.normal_()
    assert torch.equal(method.score(images, mask).anomaly_map, before)
    for p in method.ema.parameters():
        p.data.add_(0.1)
    assert not torch.equal(method.score(images, mask).anomaly_map, before)


def test_ema_weights_update_rule():
    source = torch.nn.Linear(2, 1)
    ema = EMAWeights(source, decay=0.9)
    start = source.weight.detach().clone()
    with torch.no_grad():
        source.weight.fill_(1.0)
    ema.update(source)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1)
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(InputError, match="decay"):
        EMAWeights(source, decay=1.0)


def test_batched_scoring_equals_one_slice_at_a_time():
    """The batch shares each step's simplex pattern per channel, as a single slice drawn
    with the same seed does: scoring 3 slices at once gives each slice's own maps."""
    seed_everything(0)
    method = build_method("anoddpm", **{**ANODDPM_TINY, "test_timestep": 20, "reverse_steps": 3})
    for p in method.ema.parameters():
        p.data.normal_(0, 0.05)
    images, mask = torch.rand(3, 1, 32, 32), torch.ones(3, 1, 32, 32)
    batched = method.score(images, mask).anomaly_map
    looped = torch.cat(
        [method.score(images[i : i + 1], mask[i : i + 1]).anomaly_map for i in range(3)]
    )
    assert batched.std() > 0
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
