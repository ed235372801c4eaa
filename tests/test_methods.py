"""The method contract, run for every registered method, and the registry itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import toy_methods  # noqa: F401  (registers the toy methods, so the contract covers them)
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.io.scores import ScoresFile
from brainuad.methods import (
    Method,
    ScoreOutput,
    available_methods,
    build_method,
    default_hparams,
    method_class,
    register,
)
from brainuad.methods.base import FINAL_STAGE
from brainuad.methods.registry import _REGISTRY
from brainuad.provenance import seed_everything
from brainuad.scoring import score_dataset_split, score_split
from brainuad.slices.hdf5 import SliceDataset, SliceFile, SliceWriter
from brainuad.slices.splits import (
    healthy_splits,
    lesion_splits,
    read_splits,
    subjects_in,
    write_splits,
)
from brainuad.training.fold import TrainingCohort, train_fold


def write_slices(
    path, n_subjects: int = 2, per_subject: int = 8, size: int = 32, lesions: bool = False
) -> None:
    """A tiny slice file: a disc of 'brain' with a smooth gradient, 1 channel; with
    ``lesions``, every other slice has a bright square (seg 1, label 1)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    square = (abs(yy - size / 2) < size / 8) & (abs(xx - size / 2) < size / 8)
    with SliceWriter(path, sequences=["t2"], height=size, width=size) as writer:
        for s in range(n_subjects):
            images = np.zeros((per_subject, 1, size, size), np.float32)
            seg = np.zeros((per_subject, size, size), np.uint8)
            for i in range(per_subject):
                level = 0.4 + 0.4 * i / per_subject
                images[i, 0] = disc * (level + 0.1 * xx / size + 0.02 * rng.random((size, size)))
                if lesions and i % 2:
                    images[i, 0][square] = 1.0
                    seg[i][square] = 1
            mask = np.repeat(disc[None], per_subject, 0).astype(np.uint8)
            writer.append_subject(f"sub-{s}", images, mask, seg, np.arange(per_subject))


def write_cohorts(tmp_path) -> dict[str, TrainingCohort]:
    """A healthy cohort (2 folds) and a lesion cohort with a train split, 4 subjects each."""
    cohorts = {}
    for name, lesions in (("healthy", False), ("lesion", True)):
        slices, splits = tmp_path / f"{name}.h5", tmp_path / f"{name}.csv"
        write_slices(slices, n_subjects=4, lesions=lesions)
        subjects = [f"sub-{s}" for s in range(4)]
        if lesions:
            table = lesion_splits(
                subjects, n_folds=2, val_fraction=0.25, train_fraction=0.5, seed=0
            )
        else:
            table = healthy_splits(subjects, n_folds=2, test_fraction=0.25, seed=0)
        write_splits(table, splits)
        cohorts[name] = TrainingCohort(name, slices, splits, healthy_training_cohort=not lesions)
    return cohorts


def train_in(tmp_path, name: str, cohorts, training: dict, *, stage: str = FINAL_STAGE, **kwargs):
    """``train_fold`` of ``stage`` with its files under ``tmp_path`` (named after the stage)."""
    return train_fold(
        method_name=name,
        model_hparams=kwargs.pop("model_hparams", TINY_HPARAMS[name]),
        training=training,
        cohorts=cohorts,
        fold=kwargs.pop("fold", 0),
        stage=stage,
        checkpoint_dir=tmp_path / "checkpoints" / stage,
        out_model=tmp_path / f"{stage}.pt",
        out_log=tmp_path / f"{stage}_log.csv",
        out_config=tmp_path / f"{stage}.json",
        seed=0,
        device="cpu",
        progress=False,
        **kwargs,
    )


def train_every_stage(name, cohorts, tmp_path, max_steps: int = 3) -> dict[str, object]:
    """Train each stage of ``name`` in declared order through ``train_fold`` (what the
    workflow runs), each consuming the files of the stages it names; the stage files."""
    cls = method_class(name)
    files: dict[str, object] = {}
    for stage in cls.stages:
        weak = cls.stage_supervision(stage.name) == "image_labels"
        summary = train_in(
            tmp_path,
            name,
            [cohorts["lesion"], cohorts["healthy"]] if weak else [cohorts["healthy"]],
            {"max_steps": max_steps, "batch_size": 4, "checkpoint_every": 3},
            stage=stage.name,
            consumed={earlier: files[earlier] for earlier in stage.consumes},
        )
        assert summary["stage"] == stage.name and summary["final_step"] == max_steps
        assert np.isfinite(summary["final_train_loss"])
        files[stage.name] = tmp_path / f"{stage.name}.pt"
    return files


def test_every_method_has_tiny_hparams():
    assert set(available_methods()) <= set(TINY_HPARAMS)
    assert {"ae", "ddpm", "intensity"} <= set(available_methods())


@pytest.mark.parametrize("name", available_methods())
def test_method_contract(name, tmp_path):
    """Train every stage in order as the workflow does, score, save, load, score again:
    identical maps; scoring twice is deterministic; no reconstruction where there is none."""
    cls = method_class(name)
    assert cls.supervision in ("healthy", "image_labels")
    names = [stage.name for stage in cls.stages]
    assert len(set(names)) == len(names)
    if names:
        assert names[-1] == FINAL_STAGE
    for position, stage in enumerate(cls.stages):
        assert set(stage.consumes) <= set(names[:position]), "a stage consumes earlier ones"
    cohorts = write_cohorts(tmp_path)
    if cls.stages:
        method = Method.load(train_every_stage(name, cohorts, tmp_path)[FINAL_STAGE])
    else:
        method = build_method(name, **TINY_HPARAMS[name])
    assert isinstance(method, cls)

    dataset = SliceDataset(cohorts["healthy"].slice_path)
    images = torch.stack([dataset[i]["image"] for i in range(5)])
    mask = torch.stack([dataset[i]["brainmask"] for i in range(5)])
    first = method.score(images, mask)
    assert isinstance(first, ScoreOutput)
    assert first.anomaly_map.shape == (5, 32, 32)
    assert torch.isfinite(first.anomaly_map).all()
    if method.has_reconstruction:
        assert first.reconstruction is not None
        assert first.reconstruction.shape == images.shape
    else:
        assert first.reconstruction is None
    # Scoring twice in a row is deterministic too (noise comes from score_seed).
    assert torch.equal(method.score(images, mask).anomaly_map, first.anomaly_map)

    method.save(tmp_path / "saved.pt")
    loaded = Method.load(tmp_path / "saved.pt")
    assert type(loaded) is type(method)
    assert loaded.hparams == method.hparams
    second = loaded.score(images, mask)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    if method.has_reconstruction:
        assert torch.equal(first.reconstruction, second.reconstruction)

    # Through the scoring entry point: a file without reconstruction when there is none.
    out = tmp_path / "scores.h5"
    score_dataset_split(
        model_path=None if not cls.stages else tmp_path / "saved.pt",
        build=None if cls.stages else {"implementation": name, "model": TINY_HPARAMS[name]},
        slice_path=cohorts["healthy"].slice_path,
        splits_path=cohorts["healthy"].splits_path,
        fold=0,
        split="val",
        out_path=out,
        batch_size=4,
        device="cpu",
    )
    assert ScoresFile(out).has_reconstruction == method.has_reconstruction


def test_two_stage_method_starts_from_the_earlier_stage(tmp_path):
    """The `model` stage loads the modules `pretrain` trained (encoder, head) and nothing
    else; the pretraining file alone does not make a scorable model."""
    files = train_every_stage("toy_two_stage", write_cohorts(tmp_path), tmp_path)
    pretrained = Method.load(files["pretrain"])
    seed_everything(123)
    fresh = build_method("toy_two_stage")
    decoder_before = fresh.decoder.weight.detach().clone()
    fresh.load_stage("pretrain", files["pretrain"])
    assert torch.equal(fresh.encoder.weight, pretrained.encoder.weight)
    assert torch.equal(fresh.pretrain_head.weight, pretrained.pretrain_head.weight)
    assert torch.equal(fresh.decoder.weight, decoder_before)
    # The pretrain stage trained only its modules: its decoder is still the initial one.
    seed_everything(0)
    initial = build_method("toy_two_stage")
    assert torch.equal(pretrained.decoder.weight, initial.decoder.weight)
    assert not torch.equal(pretrained.encoder.weight, initial.encoder.weight)
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["consumed"] == {"pretrain": str(files["pretrain"])}


def test_weakly_supervised_method_learns_from_slice_labels(tmp_path):
    """Only labelled slices are bright: after training on the lesion cohort's train split
    with balanced batches, lesion slices score higher than healthy ones."""
    cohorts = write_cohorts(tmp_path)
    seed_everything(0)
    training = {"max_steps": 60, "batch_size": 8, "learning_rate": 0.05, "sampler": "balanced"}
    summary = train_in(tmp_path, "toy_weak", [cohorts["lesion"]], training, fold=1)
    assert summary["sampler"] == "balanced"
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["trained_on"]["supervision"] == "image_labels"
    assert record["trained_on"]["datasets"]["lesion"]["train"] == subjects_in(
        read_splits(cohorts["lesion"].splits_path), fold=1, split="train"
    )
    method = Method.load(tmp_path / "model.pt")
    data = SliceFile(cohorts["lesion"].slice_path).read(np.arange(16))
    maps = method.score(
        torch.from_numpy(data["images"]), torch.from_numpy(data["brainmask"][:, None] * 1.0)
    ).anomaly_map
    slice_scores = maps.flatten(1).amax(dim=1).numpy()
    labels = data["label"].astype(bool)
    assert labels.any() and (~labels).any()
    assert slice_scores[labels].min() > slice_scores[~labels].max()


def test_healthy_method_refuses_lesion_cohort(tmp_path):
    cohorts = write_cohorts(tmp_path)
    with pytest.raises(InputError, match="healthy slices only"):
        train_in(tmp_path, "ae", [cohorts["lesion"]], {"max_steps": 1})
    assert not (tmp_path / "model.pt").exists()


def test_method_inputs_and_own_size_in_scoring(tmp_path):
    """A method reading one of two sequences at its own size: maps come back on the slice
    grid, and the scores file records both; the training-free intensity map of the chosen
    sequence is that sequence's intensity inside the brain."""
    size = 32
    rng = np.random.default_rng(1)
    images = rng.random((6, 2, size, size)).astype(np.float32)
    mask = np.ones((6, size, size), np.uint8)
    slices = tmp_path / "two.h5"
    with SliceWriter(slices, sequences=["t2", "flair"], height=size, width=size) as writer:
        writer.append_subject("sub-0", images, mask, np.zeros_like(mask), np.arange(6))
    method = build_method("intensity", in_channels=1)
    out = tmp_path / "scores.h5"
    summary = score_split(
        method,
        slice_path=slices,
        rows=np.arange(6),
        out_path=out,
        batch_size=4,
        device="cpu",
        attrs={"split": "test"},
        inputs=["flair"],
    )
    assert summary["inputs"] == ["flair"]
    np.testing.assert_allclose(ScoresFile(out).read()["anomaly_map"], images[:, 1], atol=1e-6)
    assert ScoresFile(out).inputs == ["flair"]

    resized = tmp_path / "resized.h5"
    score_split(
        method,
        slice_path=slices,
        rows=np.arange(6),
        out_path=resized,
        batch_size=4,
        device="cpu",
        attrs={"split": "test"},
        inputs=["flair"],
        size=16,
    )
    scores = ScoresFile(resized)
    assert scores.read()["anomaly_map"].shape == (6, size, size)
    assert int(scores.attrs["method_size"]) == 16
    # Down and up again: a smoothed copy of the flair channel, not of t2.
    result = scores.read()["anomaly_map"]
    assert np.abs(result - images[:, 1]).mean() < np.abs(result - images[:, 0]).mean()


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


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(TINY_HPARAMS) if "attention_levels" in TINY_HPARAMS[n]],
)
def test_attention_flags_must_match_the_unet_levels(name):
    """Every diffusion UNet takes one attention flag per level of its channels."""
    hparams = {**TINY_HPARAMS[name], "attention_levels": (False,) * 3}
    with pytest.raises(InputError, match=r"attention_levels \(False, False, False\).*\(8, 16"):
        build_method(name, **hparams)


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


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_ddpm_trains_and_scores_with_its_configured_noise(monkeypatch, noise):
    """`noise` selects the shared noise component: Behrendt's simplex pattern is one 2D
    field repeated over the batch and not unit variance; Gaussian noise differs per sample.
    The same kind is used in training and in the scoring step."""
    method = build_method("ddpm", **TINY_HPARAMS["ddpm"], noise=noise)
    seen = []
    add_noise = method.scheduler.add_noise

    def spy(original, drawn, timesteps):
        seen.append(drawn.clone())
        return add_noise(original, drawn, timesteps)

    monkeypatch.setattr(method.scheduler, "add_noise", spy)
    images, mask = torch.rand(4, 1, 32, 32), torch.ones(4, 1, 32, 32)
    method.training_loss({"image": images, "brainmask": mask})
    method.score(images, mask)
    for drawn in seen:
        same_over_batch = all(torch.equal(drawn[0], drawn[i]) for i in range(1, 4))
        assert same_over_batch == (noise == "simplex")
        if noise == "simplex":
            assert 0.2 < float(drawn.std()) < 0.9
