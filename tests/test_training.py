"""The shared training loop: learning, checkpoint/resume, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hparams import AE_TINY, ANODDPM_TINY, DDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.ae import ConvAutoencoder
from brainuad.provenance import seed_everything
from brainuad.slices.hdf5 import SliceDataset, SliceWriter
from brainuad.training.device import resolve_device
from brainuad.training.fold import steps_for_epochs, training_data_fingerprint
from brainuad.training.loop import (
    InfiniteBalancedBatches,
    InfiniteShuffledBatches,
    InfiniteVolumeBatches,
    TrainingRun,
    read_log,
    train,
)


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


@pytest.mark.parametrize(
    "name, hparams",
    # anoddpm: gradient clipping and EMA weights (in the state dict) resume exactly too.
    [("ae", AE_TINY), ("ddpm", DDPM_TINY), ("anoddpm", ANODDPM_TINY)],
)
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


def test_volume_sampler_epoch_is_one_slice_per_volume():
    """The cDDPM reference's epoch: each epoch takes exactly one slice of every subject."""
    subjects = ["a"] * 5 + ["b"] * 3 + ["c"] * 7 + ["d"] * 1
    stream = iter(InfiniteVolumeBatches(subjects, batch_size=2, seed=4))
    batches = [next(stream) for _ in range(6)]  # 3 epochs of 4 volumes
    flat = [i for batch in batches for i in batch]
    for epoch in range(3):
        picked = flat[4 * epoch : 4 * epoch + 4]
        assert sorted(subjects[i] for i in picked) == ["a", "b", "c", "d"]
    epochs = [tuple(sorted(flat[4 * e : 4 * e + 4])) for e in range(3)]
    assert len(set(epochs)) > 1, "slices are drawn anew every epoch"
    resumed = iter(InfiniteVolumeBatches(subjects, batch_size=2, seed=4, start_sample=6))
    assert [next(resumed) for _ in range(3)] == batches[3:]


def test_balanced_sampler_halves_and_resumes():
    labels = [0] * 10 + [1] * 3
    stream = iter(InfiniteBalancedBatches(labels, batch_size=4, seed=1))
    batches = [next(stream) for _ in range(5)]
    for batch in batches:
        assert sorted(labels[i] for i in batch) == [0, 0, 1, 1]
    lesion = [i for batch in batches for i in batch if labels[i]]
    assert sorted(lesion[:3]) == [10, 11, 12], "each class is a permutation per epoch"
    resumed = iter(InfiniteBalancedBatches(labels, batch_size=4, seed=1, start_sample=8))
    assert [next(resumed) for _ in range(3)] == batches[2:]
    with pytest.raises(InputError, match="healthy and lesion"):
        InfiniteBalancedBatches([0, 0], batch_size=2, seed=0)


def test_best_checkpoint_is_scored_when_asked(slices, tmp_path):
    """`score_checkpoint: best` returns the weights of the lowest validation loss, kept in
    best.pt; `last` returns the final weights. The best is remembered across a resume."""
    dataset = SliceDataset(slices)
    # A learning rate so large that the AE diverges after its first validation.
    settings = {"max_steps": 12, "validate_every": 3, "checkpoint_every": 3, "learning_rate": 1.0}
    last = fresh("ae", AE_TINY)
    train(last, dataset, dataset, make_run(tmp_path / "last", **settings))
    best = fresh("ae", AE_TINY)
    run = make_run(tmp_path / "best", score_checkpoint="best", **settings)
    summary = train(best, dataset, dataset, run)
    rows = [r for r in read_log(run.log_path) if r["val_loss"]]
    val = {int(r["step"]): float(r["val_loss"]) for r in rows}
    assert summary["best_step"] == min(val, key=val.get)
    assert summary["best_val_loss"] == min(val.values())
    stored = torch.load(run.best_path, weights_only=True)
    assert stored["step"] == summary["best_step"]
    for key, value in stored["model"].items():
        assert torch.equal(best.state_dict()[key], value), key
    if summary["best_step"] != 12:
        assert any(not torch.equal(last.state_dict()[k], v) for k, v in best.state_dict().items())
    # A finished run re-run returns the best weights again.
    again = fresh("ae", AE_TINY, seed=5)
    assert train(again, dataset, dataset, run)["best_step"] == summary["best_step"]
    for key, value in stored["model"].items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(InputError, match="needs validation"):
        train(
            fresh("ae", AE_TINY), dataset, None, make_run(tmp_path / "x", score_checkpoint="best")
        )


class _DecayingAE(ConvAutoencoder):
    """The tiny AE with a step-decay learning-rate schedule (not registered)."""

    name = "ae"

    def configure_lr_scheduler(self, optimizer, max_steps, stage="model"):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


def test_lr_schedule_is_logged_and_resumed(slices, tmp_path):
    dataset = SliceDataset(slices)
    seed_everything(7)
    reference = _DecayingAE(**AE_TINY)
    train(reference, dataset, None, make_run(tmp_path / "ref", max_steps=9))
    lrs = [float(r["lr"]) for r in read_log(tmp_path / "ref" / "log.csv")]
    assert lrs == [1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 3

    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    run = make_run(tmp_path / "cut", max_steps=9)
    seed_everything(7)
    with pytest.raises(KeyboardInterrupt):
        train(_DecayingAE(**AE_TINY), dataset, None, run, on_step=interrupt)
    seed_everything(7)
    train(_DecayingAE(**AE_TINY), dataset, None, run)
    assert [float(r["lr"]) for r in read_log(run.log_path)] == lrs
    assert losses(run.log_path) == losses(tmp_path / "ref" / "log.csv")


def test_unknown_stage_and_stage_in_checkpoint(slices, tmp_path):
    dataset = SliceDataset(slices)
    with pytest.raises(InputError, match="no stage 'pretrain'"):
        train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path), stage="pretrain")
    train(fresh("ae", AE_TINY), dataset, None, make_run(tmp_path, max_steps=2))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["stage"] == "model"


def test_steps_for_epochs_matches_the_reference():
    """387 IXI training volumes, batch 32: DDPM's 1600 epochs ≈ 19 350 steps, cDDPM's 1200
    ≈ 14 513 (issue: 'under 20k' and 'about 14k')."""
    assert steps_for_epochs(1600, epoch_size=387, batch_size=32) == 19350
    assert steps_for_epochs(1200, epoch_size=387, batch_size=32) == 14513
    assert steps_for_epochs(0.01, epoch_size=10, batch_size=32) == 1


def test_longer_run_with_lr_schedule_is_refused(slices, tmp_path):
    """A cosine schedule spans the run's length: extending the run would silently keep the
    old schedule (its state restores the old T_max), so the checkpoint is refused."""
    dataset = SliceDataset(slices)
    seed_everything(7)
    train(_DecayingAE(**AE_TINY), dataset, None, make_run(tmp_path, max_steps=5))
    seed_everything(7)
    with pytest.raises(InputError, match="lr_schedule"):
        train(_DecayingAE(**AE_TINY), dataset, None, make_run(tmp_path, max_steps=8))


class _HookedAE(ConvAutoencoder):
    """The tiny AE with a tiny gradient-norm limit, recording the loop's optimiser-step
    hooks and the gradient norm the optimiser then sees (not registered)."""

    name = "ae"

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["gradient_clip_norm"] = 1e-3
        self.calls: list[tuple] = []

    def before_optimizer_step(self, stage="model"):
        super().before_optimizer_step(stage)
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.calls.append(("before", stage, float(torch.stack(grads).norm())))

    def after_optimizer_step(self, stage="model"):
        self.calls.append(("after", stage))


def test_optimizer_step_hooks_and_gradient_clipping(slices, tmp_path):
    """The loop calls before_optimizer_step (where the base class clips gradients to the
    `gradient_clip_norm` hyperparameter) and after_optimizer_step around every step."""
    dataset = SliceDataset(slices)
    seed_everything(7)
    method = _HookedAE(**AE_TINY)
    train(method, dataset, None, make_run(tmp_path, max_steps=3))
    assert [c[:2] for c in method.calls] == [("before", "model"), ("after", "model")] * 3
    norms = [c[2] for c in method.calls if c[0] == "before"]
    assert all(n <= 1e-3 * (1 + 1e-5) for n in norms)
    assert all(n > 5e-4 for n in norms)  # clipped to the limit, not zeroed
