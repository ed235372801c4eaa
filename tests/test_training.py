"""The shared training loop: learning, checkpoint/resume, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hparams import AE_TINY, DDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.provenance import seed_everything
from brainuad.slices.hdf5 import SliceDataset, SliceWriter
from brainuad.training.device import resolve_device
from brainuad.training.fold import training_data_fingerprint
from brainuad.training.loop import InfiniteShuffledBatches, TrainingRun, read_log, train


def write_slices(path, brightness: float = 0.5):
    """16 easy 32 × 32 slices: a disc with a smooth gradient, 2 subjects."""
    size = 32
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    with SliceWriter(path, sequences=["t2"], height=size, width=size) as writer:
        for s in range(2):
            levels = [disc * (brightness + 0.05 * i + 0.2 * yy / size) for i in range(8)]
            images = np.stack(levels)[:, None].astype(np.float32)
            mask = np.repeat(disc[None], 8, 0).astype(np.uint8)
            writer.append_subject(f"sub-{s}", images, mask, np.zeros_like(mask), np.arange(8))
    return path


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    return write_slices(tmp_path_factory.mktemp("data") / "slices.h5")


def make_run(tmp_path, **overrides) -> TrainingRun:
    settings = {
        "checkpoint_path": tmp_path / "ckpt.pt",
        "log_path": tmp_path / "log.csv",
        "max_steps": 10,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "checkpoint_every": 5,
        "validate_every": 5,
        "seed": 7,
        "device": "cpu",
        "progress": False,
    }
    return TrainingRun(**(settings | overrides))


def fresh(name: str, hparams: dict, seed: int = 7):
    seed_everything(seed)
    return build_method(name, **hparams)


def losses(log_path) -> list[tuple[str, str, str]]:
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in read_log(log_path)]


def test_loss_decreases(slices, tmp_path):
    dataset = SliceDataset(slices)
    method = fresh("ae", AE_TINY)
    run = make_run(
        tmp_path, max_steps=30, learning_rate=3e-3, checkpoint_every=30, validate_every=30
    )
    summary = train(method, dataset, dataset, run)
    assert summary["steps_run"] == 30
    rows = read_log(run.log_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    first = np.mean([float(r["train_loss"]) for r in rows[:5]])
    last = np.mean([float(r["train_loss"]) for r in rows[-5:]])
    assert last < 0.5 * first
    assert rows[-1]["val_loss"] != "" and rows[0]["val_loss"] == ""


@pytest.mark.parametrize("name, hparams", [("ae", AE_TINY), ("ddpm", DDPM_TINY)])
def test_resume_after_interrupt(slices, tmp_path, name, hparams):
    dataset = SliceDataset(slices)

    # Reference: one uninterrupted run.
    reference_dir = tmp_path / "reference"
    reference = fresh(name, hparams)
    train(reference, dataset, dataset, make_run(reference_dir))

    # Interrupted after step 7 (checkpoint at 5), then re-run.
    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    run = make_run(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(fresh(name, hparams), dataset, dataset, run, on_step=interrupt)
    assert [int(r["step"]) for r in read_log(run.log_path)] == list(range(1, 8))
    assert torch.load(run.checkpoint_path, weights_only=True)["step"] == 5

    # A new process would build a fresh method with the same seed; build it with another
    # seed to prove the weights come from the checkpoint.
    resumed = fresh(name, hparams, seed=123)
    summary = train(resumed, dataset, dataset, run)
    assert summary["resumed"] and summary["start_step"] == 5
    assert summary["final_step"] == 10 and summary["steps_run"] == 5
    steps = [int(r["step"]) for r in read_log(run.log_path)]
    assert steps == list(range(1, 11))  # continues from 5, no duplicates, ends at 10
    # Restored optimiser, RNG and data order: the same losses as never interrupted.
    assert losses(run.log_path) == losses(reference_dir / "log.csv")
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    # A finished run re-run does nothing more, but returns the trained weights.
    again = fresh(name, hparams, seed=99)
    summary = train(again, dataset, dataset, run)
    assert summary["steps_run"] == 0 and summary["final_step"] == 10
    assert [int(r["step"]) for r in read_log(run.log_path)] == list(range(1, 11))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_resume_after_kill_during_checkpoint_write(slices, tmp_path):
    """SIGKILL while step 10's checkpoint is being written: the log already has row 10, the
    checkpoint on disk is still step 5 and a partial temporary sits next to it. The resumed
    run starts from step 5, drops the orphaned log rows and deletes the temporary."""
    dataset = SliceDataset(slices)
    run = make_run(tmp_path, max_steps=10)
    train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=5))
    step5 = run.checkpoint_path.read_bytes()
    train(fresh("ae", AE_TINY), dataset, None, run)
    run.checkpoint_path.write_bytes(step5)  # the step-10 checkpoint never got renamed in
    partial = tmp_path / f".{run.checkpoint_path.name}.k1ll3d.tmp.pt"
    partial.write_bytes(step5[: len(step5) // 2])
    unrelated = tmp_path / "notes.tmp.pt"
    unrelated.write_bytes(b"keep")

    summary = train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=12))
    assert summary["start_step"] == 5 and summary["final_step"] == 12
    assert [int(r["step"]) for r in read_log(run.log_path)] == list(range(1, 13))
    assert not partial.exists()
    assert unrelated.read_bytes() == b"keep"


def test_same_seed_same_log(slices, tmp_path):
    dataset = SliceDataset(slices)
    train(fresh("ddpm", DDPM_TINY), dataset, dataset, make_run(tmp_path / "a", max_steps=6))
    train(fresh("ddpm", DDPM_TINY), dataset, dataset, make_run(tmp_path / "b", max_steps=6))
    train(
        fresh("ddpm", DDPM_TINY, seed=8),
        dataset,
        dataset,
        make_run(tmp_path / "c", max_steps=6, seed=8),
    )
    a, b, c = (losses(tmp_path / d / "log.csv") for d in "abc")
    assert a == b
    assert a != c


def test_checkpoint_of_other_config_refused(slices, tmp_path):
    dataset = SliceDataset(slices)
    train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=2))
    other = fresh("ae", {**AE_TINY, "channels": (8, 8)})
    with pytest.raises(InputError, match="hparams"):
        train(other, dataset, None, make_run(tmp_path, max_steps=4))
    with pytest.raises(InputError, match="seed"):
        train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=4, seed=1))


def test_finished_checkpoint_of_other_learning_rate_refused(slices, tmp_path):
    """A finished run re-run with another learning rate must not return the old weights."""
    dataset = SliceDataset(slices)
    train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=2))
    with pytest.raises(InputError, match=r"learning_rate=0\.001 .*delete the checkpoint") as info:
        train(
            fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=2, learning_rate=1e-2)
        )
    assert str(tmp_path / "ckpt.pt") in str(info.value)
    # On CPU bf16 autocast is never used, so the mixed_precision setting changes nothing.
    summary = train(
        fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=2, mixed_precision=False)
    )
    assert summary["steps_run"] == 0 and summary["mixed_precision"] is False


def test_checkpoint_of_other_training_data_refused(slices, tmp_path):
    dataset = SliceDataset(slices)
    fingerprint = training_data_fingerprint(dataset)
    train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path), data_fingerprint=fingerprint)

    fewer = SliceDataset(slices, subjects=["sub-0"])
    with pytest.raises(InputError, match="train_slices=16 but this run has 8"):
        train(fresh("ae", AE_TINY), fewer, None, make_run(tmp_path))

    # Same subjects, rows and size, other pixels: only the fingerprint tells them apart.
    rebuilt = SliceDataset(write_slices(tmp_path / "rebuilt.h5", brightness=0.4))
    other = training_data_fingerprint(rebuilt)
    assert other != fingerprint
    with pytest.raises(InputError, match=r"data_fingerprint=.*delete the checkpoint"):
        train(fresh("ae", AE_TINY), rebuilt, None, make_run(tmp_path), data_fingerprint=other)

    again = train(
        fresh("ae", AE_TINY), dataset, None, make_run(tmp_path), data_fingerprint=fingerprint
    )
    assert again["steps_run"] == 0 and again["data_fingerprint"] == fingerprint


def test_training_data_fingerprint(slices, tmp_path):
    copy = write_slices(tmp_path / "copy.h5")
    assert training_data_fingerprint(SliceDataset(copy)) == training_data_fingerprint(
        SliceDataset(slices)
    )
    rows = SliceDataset(slices, rows=np.arange(1, 16))
    assert training_data_fingerprint(rows) != training_data_fingerprint(SliceDataset(slices))


def test_scoring_hparams_do_not_invalidate_checkpoint(slices, tmp_path):
    """ddpm's test_timestep and score_seed only affect scoring: a finished checkpoint is
    reused, and the method keeps the new values (they go into the saved model)."""
    dataset = SliceDataset(slices)
    trained = fresh("ddpm", DDPM_TINY)
    train(trained, dataset, None, make_run(tmp_path, max_steps=2))
    rescored = fresh("ddpm", {**DDPM_TINY, "test_timestep": 250, "score_seed": 3}, seed=1)
    summary = train(rescored, dataset, None, make_run(tmp_path, max_steps=2))
    assert summary["steps_run"] == 0
    assert rescored.hparams["test_timestep"] == 250 and rescored.hparams["score_seed"] == 3
    for key, value in trained.state_dict().items():
        assert torch.equal(value, rescored.state_dict()[key]), key
    with pytest.raises(InputError, match="hparams"):
        train(fresh("ddpm", {**DDPM_TINY, "loss": "l2"}), dataset, None, make_run(tmp_path))


def test_checkpoint_contents(slices, tmp_path):
    dataset = SliceDataset(slices)
    run = make_run(tmp_path, max_steps=2, checkpoint_every=1)
    train(fresh("ae", AE_TINY), dataset, None, run)
    checkpoint = torch.load(run.checkpoint_path, weights_only=True)
    assert checkpoint["step"] == 2
    assert checkpoint["method"] == "ae"
    assert checkpoint["data"] == {
        "seed": 7,
        "batch_size": 4,
        "samples_consumed": 8,
        "train_slices": 16,
        "fingerprint": None,
    }
    assert checkpoint["learning_rate"] == 1e-3 and checkpoint["mixed_precision"] is False
    assert {"model", "optimizer", "rng", "hparams", "elapsed_seconds"} <= set(checkpoint)
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng"])


def test_sampler_resumes_mid_epoch():
    full = InfiniteShuffledBatches(10, 4, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(6)]
    resumed = iter(InfiniteShuffledBatches(10, 4, seed=3, start_sample=3 * 4))
    assert [next(resumed) for _ in range(3)] == first[3:]
    flat = [i for batch in first[:5] for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize(
    "field, value",
    [("max_steps", 0), ("checkpoint_every", -1), ("batch_size", 0), ("device", "tpu")],
)
def test_training_run_validation(tmp_path, field, value):
    with pytest.raises(InputError, match=field):
        make_run(tmp_path, **{field: value})


def test_training_run_device_checked_like_scoring(tmp_path):
    """TrainingRun and resolve_device (scoring) accept and refuse the same names."""
    assert make_run(tmp_path, device="cuda:1").device == "cuda:1"
    with pytest.raises(InputError) as run_error:
        make_run(tmp_path, device="gpu0")
    with pytest.raises(InputError) as resolve_error:
        resolve_device("gpu0")
    assert str(run_error.value) == str(resolve_error.value)
    assert "gpu0" in str(run_error.value)
