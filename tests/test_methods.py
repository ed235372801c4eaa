"""The method contract, run for every registered method, and the registry itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import (
    Method,
    ScoreOutput,
    available_methods,
    build_method,
    default_hparams,
    register,
)
from brainuad.methods.registry import _REGISTRY
from brainuad.provenance import seed_everything
from brainuad.slices.hdf5 import SliceDataset, SliceWriter
from brainuad.training.loop import TrainingRun


def write_slices(path, n_subjects: int = 2, per_subject: int = 8, size: int = 32) -> None:
    """A tiny slice file: a bright disc of 'brain' with a smooth gradient, 1 channel."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    with SliceWriter(path, sequences=["t2"], height=size, width=size) as writer:
        for s in range(n_subjects):
            images = np.zeros((per_subject, 1, size, size), np.float32)
            for i in range(per_subject):
                level = 0.4 + 0.4 * i / per_subject
                images[i, 0] = disc * (level + 0.1 * xx / size + 0.02 * rng.random((size, size)))
            mask = np.repeat(disc[None], per_subject, 0).astype(np.uint8)
            seg = np.zeros_like(mask)
            writer.append_subject(f"sub-{s}", images, mask, seg, np.arange(per_subject))


def test_every_method_has_tiny_hparams():
    assert set(available_methods()) <= set(TINY_HPARAMS)
    assert {"ae", "ddpm"} <= set(available_methods())


@pytest.mark.parametrize("name", available_methods())
def test_method_contract(name, tmp_path):
    """Fit a few steps, score, save, load, score again: identical maps."""
    slice_path = tmp_path / "slices.h5"
    write_slices(slice_path)
    seed_everything(0)
    method = build_method(name, **TINY_HPARAMS[name])
    assert isinstance(method, Method)
    assert method.supervision in ("healthy", "image_labels")
    run = TrainingRun(
        checkpoint_path=tmp_path / "ckpt.pt",
        log_path=tmp_path / "log.csv",
        max_steps=3,
        batch_size=4,
        checkpoint_every=3,
        validate_every=3,
        device="cpu",
        progress=False,
    )
    dataset = SliceDataset(slice_path)
    summary = method.fit(dataset, dataset, run)
    assert summary["final_step"] == 3
    assert np.isfinite(summary["final_train_loss"])

    images = torch.stack([dataset[i]["image"] for i in range(5)])
    mask = torch.stack([dataset[i]["brainmask"] for i in range(5)])
    first = method.score(images, mask)
    assert isinstance(first, ScoreOutput)
    assert first.anomaly_map.shape == (5, 32, 32)
    assert torch.isfinite(first.anomaly_map).all()
    if method.has_reconstruction:
        assert first.reconstruction is not None
        assert first.reconstruction.shape == images.shape
    # Scoring twice in a row is deterministic too (noise comes from score_seed).
    assert torch.equal(method.score(images, mask).anomaly_map, first.anomaly_map)

    method.save(tmp_path / "model.pt")
    loaded = Method.load(tmp_path / "model.pt")
    assert type(loaded) is type(method)
    assert loaded.hparams == method.hparams
    second = loaded.score(images, mask)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    if method.has_reconstruction:
        assert torch.equal(first.reconstruction, second.reconstruction)


@pytest.mark.parametrize("name", available_methods())
def test_unknown_hparam_names_it(name):
    with pytest.raises(InputError, match="no_such_knob") as info:
        build_method(name, no_such_knob=1)
    message = str(info.value)
    assert name in message
    for valid in default_hparams(name):
        assert valid in message


def test_invalid_hparam_value_is_input_error():
    with pytest.raises(InputError, match=r"ddpm.*test_timestep"):
        build_method("ddpm", **TINY_HPARAMS["ddpm"], test_timestep=5000)
    with pytest.raises(InputError, match=r"ae.*loss"):
        build_method("ae", **TINY_HPARAMS["ae"], loss="l3")
    with pytest.raises(InputError, match="ddpm"):
        build_method("ddpm", channels=(16, 32), attention_levels=(False, False), norm_num_groups=7)


def test_unknown_method_lists_available():
    with pytest.raises(InputError, match="ddpm"):
        build_method("no-such-method")


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register("ae")
        class AnotherAE(Method):  # pragma: no cover - never registered
            def training_loss(self, batch):
                raise NotImplementedError

            def _score(self, images, brainmask, generator):
                raise NotImplementedError

    assert _REGISTRY["ae"].__name__ == "ConvAutoencoder"


@pytest.mark.parametrize("name", available_methods())
def test_scoring_hparams_are_hparams(name):
    assert _REGISTRY[name].scoring_hparams <= set(default_hparams(name))


def test_scoring_hparams_must_be_constructor_keywords():
    with pytest.raises(ValueError, match="no_such_knob"):

        @register("scoring-hparams-typo")
        class Typo(Method):  # pragma: no cover - never registered
            scoring_hparams = frozenset({"no_such_knob"})

            def __init__(self, *, score_seed: int = 0) -> None:
                super().__init__(score_seed=score_seed)

            def training_loss(self, batch):
                raise NotImplementedError

            def _score(self, images, brainmask, generator):
                raise NotImplementedError

    assert "scoring-hparams-typo" not in _REGISTRY


def test_load_refuses_wrong_class(tmp_path):
    from brainuad.methods.ae import ConvAutoencoder
    from brainuad.methods.ddpm import DDPM

    build_method("ae", **TINY_HPARAMS["ae"]).save(tmp_path / "ae.pt")
    assert isinstance(ConvAutoencoder.load(tmp_path / "ae.pt"), ConvAutoencoder)
    with pytest.raises(InputError, match="expected 'ddpm'"):
        DDPM.load(tmp_path / "ae.pt")


# MONAI-style shape cases: [hparams, input_shape, expected anomaly-map shape].
SHAPE_CASES = [
    ["ae", TINY_HPARAMS["ae"], (2, 1, 32, 32), (2, 32, 32)],
    ["ae", {**TINY_HPARAMS["ae"], "in_channels": 2}, (3, 2, 32, 32), (3, 32, 32)],
    ["ae", {"channels": (8, 8, 16), "strides": (2, 2, 1)}, (1, 1, 16, 24), (1, 16, 24)],
    ["ddpm", TINY_HPARAMS["ddpm"], (2, 1, 32, 32), (2, 32, 32)],
    ["ddpm", {**TINY_HPARAMS["ddpm"], "in_channels": 2}, (1, 2, 32, 32), (1, 32, 32)],
    [
        "ddpm",
        {**TINY_HPARAMS["ddpm"], "attention_levels": (False, True), "test_timestep": 250},
        (2, 1, 16, 16),
        (2, 16, 16),
    ],
]


@pytest.mark.parametrize("name, hparams, input_shape, expected_shape", SHAPE_CASES)
def test_score_shapes(name, hparams, input_shape, expected_shape):
    method = build_method(name, **hparams)
    images = torch.rand(input_shape)
    mask = torch.ones(input_shape[0], 1, *input_shape[2:])
    out = method.score(images, mask)
    assert out.anomaly_map.shape == expected_shape
    assert out.reconstruction is not None and out.reconstruction.shape == input_shape
    batch = {"image": images, "brainmask": mask}
    loss = method.training_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_ddpm_known_values(monkeypatch):
    """Untrained, MONAI's zero-initialised output layer predicts x0 = 0 in [-1, 1] scale:
    the reconstruction is 0.5 and the map |x − 0.5|; and scoring noises to index t − 1."""
    torch.manual_seed(0)
    method = build_method("ddpm", **TINY_HPARAMS["ddpm"], test_timestep=500)
    seen = []
    add_noise = method.scheduler.add_noise

    def spy(original, noise, timesteps):
        seen.append(timesteps.clone())
        return add_noise(original, noise, timesteps)

    monkeypatch.setattr(method.scheduler, "add_noise", spy)
    images, mask = torch.rand(2, 1, 16, 16), torch.ones(2, 1, 16, 16)
    out = method.score(images, mask)
    assert torch.equal(seen[0], torch.tensor([499, 499]))
    torch.testing.assert_close(out.reconstruction, torch.full_like(images, 0.5))
    torch.testing.assert_close(out.anomaly_map, (images - 0.5).abs()[:, 0])
