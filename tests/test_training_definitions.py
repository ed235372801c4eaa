"""The training loop's samplers, validation and bookkeeping against their definitions, with
no model training: epoch ``e`` is ``torch.randperm`` seeded with ``seed + e`` (so epochs draw
different orders), batches run across epoch boundaries, validation is seeded and leaves the
training random stream as it was, and the RNG state of a checkpoint restores every stream."""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import brainuad
from brainuad.errors import InputError
from brainuad.methods.base import Method, Stage
from brainuad.provenance import seed_everything
from brainuad.training import loop
from brainuad.training.loop import (
    InfiniteBalancedBatches,
    InfiniteShuffledBatches,
    InfiniteVolumeBatches,
    TrainingRun,
    make_batch_sampler,
    read_log,
    train,
    validation_loss,
)


def _take(sampler, n):
    stream = iter(sampler)
    return [next(stream) for _ in range(n)]


def test_shuffled_epochs_are_seeded_permutations_that_differ():
    batches = _take(InfiniteShuffledBatches(5, 3, seed=7), 5)  # 15 samples: 3 epochs
    flat = [i for b in batches for i in b]
    assert all(len(b) == 3 for b in batches)
    for epoch in range(3):
        expected = torch.randperm(5, generator=torch.Generator().manual_seed(7 + epoch))
        assert flat[5 * epoch : 5 * epoch + 5] == expected.tolist()
    assert flat[0:5] != flat[5:10] or flat[5:10] != flat[10:15]  # epochs draw anew
    resumed = _take(InfiniteShuffledBatches(5, 3, seed=7, start_sample=7), 2)
    assert [i for b in resumed for i in b] == flat[7:13]
    assert _take(InfiniteShuffledBatches(5, 3, seed=8), 1) != batches[:1]


def test_volume_epochs_are_seeded_one_slice_per_subject():
    subjects = ["b", "a", "b", "c", "a", "b"]  # a: 1, 4; b: 0, 2, 5; c: 3
    groups = [[1, 4], [0, 2, 5], [3]]  # sorted by subject
    batches = _take(InfiniteVolumeBatches(subjects, batch_size=2, seed=5), 6)  # 4 epochs
    flat = [i for b in batches for i in b]
    for epoch in range(4):
        generator = torch.Generator().manual_seed(5 + epoch)
        order = torch.randperm(3, generator=generator).tolist()
        picks = torch.randint(0, 2**62, (3,), generator=generator).tolist()
        expected = [groups[p][picks[p] % len(groups[p])] for p in order]
        assert flat[3 * epoch : 3 * epoch + 3] == expected
    resumed = _take(InfiniteVolumeBatches(subjects, batch_size=2, seed=5, start_sample=4), 2)
    assert [i for b in resumed for i in b] == flat[4:8]


def test_balanced_batches_follow_their_class_streams():
    labels = [1, 0, 0, 1, 0, 0, 0]  # healthy 1, 2, 4, 5, 6; lesion 0, 3
    healthy, lesion = [1, 2, 4, 5, 6], [0, 3]
    batches = _take(InfiniteBalancedBatches(labels, batch_size=5, seed=2), 4)

    def stream(members, k, n):
        out, epoch = [], 0
        while len(out) < n:
            perm = torch.randperm(
                len(members), generator=torch.Generator().manual_seed(2 + 2 * epoch + k)
            )
            out += [members[p] for p in perm.tolist()]
            epoch += 1
        return out[:n]

    h, les = stream(healthy, 0, 12), stream(lesion, 1, 8)
    for step, batch in enumerate(batches):
        assert batch == h[3 * step : 3 * step + 3] + les[2 * step : 2 * step + 2]  # 5 - 5 // 2
    resumed = _take(InfiniteBalancedBatches(labels, batch_size=5, seed=2, start_sample=10), 2)
    assert resumed == batches[2:]
    # a new stream starts at the first sample, whatever the batch size
    one = InfiniteBalancedBatches(labels, batch_size=1, seed=2)
    assert one.start == [0, 0] and _take(one, 3) == [[h[0]], [h[1]], [h[2]]]
    with pytest.raises(InputError, match="got 0 healthy and 2 lesion slices"):
        InfiniteBalancedBatches([1, 1], batch_size=2, seed=0)


class _Items:
    """A dataset of dicts, with subject ids and slice labels."""

    def __init__(self, n, subjects=None, labels=None):
        self.items = [{"image": torch.full((1, 2, 2), float(i))} for i in range(n)]
        if subjects is not None:
            self.subjects = np.array(subjects)
        if labels is not None:
            self.labels = np.array(labels)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_make_batch_sampler_kinds():
    data = _Items(4, subjects=["a", "a", "b", "b"], labels=[0, 1, 0, 1])
    assert isinstance(make_batch_sampler("slices", data, 2, 0, 0), InfiniteShuffledBatches)
    volumes = make_batch_sampler("volumes", data, 2, 3, 2)
    assert isinstance(volumes, InfiniteVolumeBatches) and volumes.start_sample == 2
    assert volumes.seed == 3 and volumes.batch_size == 2
    balanced = make_batch_sampler("balanced", data, 4, 1, 8)
    assert isinstance(balanced, InfiniteBalancedBatches) and balanced.start == [4, 4]
    shuffled = make_batch_sampler("slices", data, 3, 9, 5)
    assert (shuffled.size, shuffled.batch_size, shuffled.seed, shuffled.start_sample) == (
        4,
        3,
        9,
        5,
    )
    with pytest.raises(
        InputError, match=r"^training\.sampler 'volumes' needs a dataset with subject ids$"
    ):
        make_batch_sampler("volumes", _Items(2), 2, 0, 0)
    with pytest.raises(
        InputError, match=r"^training\.sampler 'balanced' needs a dataset with slice labels$"
    ):
        make_batch_sampler("balanced", _Items(2), 2, 0, 0)


class _NoisyLoss(torch.nn.Module):
    """A method whose loss draws from the global RNG, as diffusion losses do."""

    def __init__(self):
        super().__init__()
        self.stages = []
        self.modes = []

    def stage_loss(self, stage, batch):
        self.stages.append(stage)
        self.modes.append(self.training)
        return batch["image"].mean() + torch.rand(())


def test_validation_is_seeded_and_leaves_the_training_stream_alone():
    data = _Items(5)
    method = _NoisyLoss()
    method.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    kwargs = {"batch_size": 2, "device": torch.device("cpu"), "seed": 4, "stage": "decoder"}
    value = validation_loss(method, data, **kwargs)
    assert torch.equal(torch.rand(3), expected_next)  # training draws continue unchanged
    assert method.training and set(method.modes) == {False} and set(method.stages) == {"decoder"}
    # the definition: mean over slices of each batch's loss, batches in order, the RNG
    # seeded before the pass (the loader's iterator draws its base seed first)
    torch.manual_seed(4)
    iter(DataLoader(data, batch_size=2))
    batch_losses = [(0.5 + torch.rand(())) * 2, (2.5 + torch.rand(())) * 2, (4 + torch.rand(()))]
    assert value == pytest.approx(float(sum(batch_losses)) / 5, rel=1e-6)
    assert validation_loss(method, data, **kwargs) == value
    assert validation_loss(method, data, **{**kwargs, "seed": 5}) != value
    # at most max_batches batches: the first two (4 slices)
    torch.manual_seed(4)
    iter(DataLoader(data, batch_size=2))
    two = [(0.5 + torch.rand(())) * 2, (2.5 + torch.rand(())) * 2]
    limited = validation_loss(method, data, max_batches=2, **kwargs)
    assert limited == pytest.approx(float(sum(two)) / 4, rel=1e-6)
    method.eval()
    validation_loss(method, data, **kwargs)
    assert not method.training  # the mode it had is restored


def test_rng_state_round_trip_restores_every_stream():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = loop._get_rng_state()
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loop._set_rng_state(state)
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert state["numpy"][1].dtype == torch.int64  # loads with weights_only


def test_rng_state_covers_cuda_devices_when_there_are(monkeypatch):
    """The CUDA generators are saved and restored with the others, unless the number of
    devices changed (a checkpoint moved to another machine)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["s0", "s1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = loop._get_rng_state()
    assert state["cuda"] == ["s0", "s1"]
    loop._set_rng_state(state)
    assert restored == [["s0", "s1"]]
    loop._set_rng_state(state | {"cuda": ["s0"]})  # another number of devices: left alone
    loop._set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    assert restored == [["s0", "s1"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loop._set_rng_state(state)
    assert restored == [["s0", "s1"]] and "cuda" not in loop._get_rng_state()


def test_log_is_cut_at_the_resumed_step(tmp_path):
    path = tmp_path / "log.csv"
    loop._prepare_log(path, None)
    assert path.read_text().splitlines() == [",".join(loop.LOG_COLUMNS)]
    rows = [dict.fromkeys(loop.LOG_COLUMNS, "") for _ in range(3)]
    for step, row in zip((5, 10, 15), rows, strict=True):
        row["step"] = str(step)
    text = ",".join(loop.LOG_COLUMNS) + "\n"
    text += "".join(",".join(r[c] for c in loop.LOG_COLUMNS) + "\n" for r in rows)
    path.write_text(text)
    loop._prepare_log(path, 10)
    assert [r["step"] for r in read_log(path)] == ["5", "10"]
    loop._prepare_log(path, None)
    assert read_log(path) == []
    loop._prepare_log(tmp_path / "new.csv", 10)  # nothing to keep yet
    assert read_log(tmp_path / "new.csv") == []


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("validate_every", 0, r"TrainingRun.validate_every=0, expected an integer ≥ 1"),
        ("checkpoint_every", 0, r"TrainingRun.checkpoint_every=0, expected an integer ≥ 1"),
        ("batch_size", 0, r"TrainingRun.batch_size=0, expected an integer ≥ 1"),
        ("validation_batches", 0, r"TrainingRun.validation_batches=0"),
        ("max_steps", 2.5, r"TrainingRun.max_steps=2.5"),
        ("learning_rate", 0.0, r"TrainingRun.learning_rate=0.0, expected > 0"),
        ("num_workers", -1, r"TrainingRun.num_workers=-1, expected ≥ 0"),
        ("sampler", "random", r"training.sampler='random', expected 'slices', 'volumes'"),
        ("score_checkpoint", "first", r"training.score_checkpoint='first', expected 'last'"),
    ],
)
def test_training_run_refuses(tmp_path, field, value, match):
    with pytest.raises(InputError, match=match):
        TrainingRun(tmp_path / "c.pt", tmp_path / "l.csv", **{"max_steps": 2, field: value})


def test_training_run_defaults_and_paths(tmp_path):
    run = TrainingRun(str(tmp_path / "c" / "last.pt"), str(tmp_path / "l.csv"), max_steps=1)
    assert run.best_path == tmp_path / "c" / "best.pt"
    assert run.log_path == tmp_path / "l.csv"
    assert (run.batch_size, run.learning_rate, run.validation_batches) == (None, None, None)
    assert (run.checkpoint_every, run.validate_every, run.seed) == (500, 500, 0)
    assert (run.sampler, run.score_checkpoint, run.device) == ("slices", "last", "auto")
    assert run.mixed_precision is True and run.num_workers == 0
    TrainingRun(tmp_path / "c.pt", tmp_path / "l.csv", max_steps=1, batch_size=1, num_workers=0)
    for sampler in ("slices", "volumes", "balanced"):
        TrainingRun(tmp_path / "c.pt", tmp_path / "l.csv", max_steps=1, sampler=sampler)


def test_checkpoint_write_failing_half_way_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint save interrupted in the middle of writing (disk full, kill) leaves the
    previous checkpoint under its name, readable, and no partial file in its place."""
    from pathlib import Path

    from brainuad.io.torchfile import load_newest_readable, save_keeping_previous

    path = tmp_path / "last.pt"
    save_keeping_previous({"step": 5, "w": torch.arange(4)}, path)
    before = path.read_bytes()
    real_write = Path.write_bytes

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_keeping_previous({"step": 10, "w": torch.arange(8)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    loaded, source = load_newest_readable(path, "checkpoint")
    assert loaded["step"] == 5 and source == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.previous.pt", "last.pt"]


# -- train() against the plain PyTorch loop, with a one-weight method ------------------------
#
# `train` is, by its definition, the textbook loop (seed everything, Adam, for each batch of
# the seeded sampler: loss, zero_grad, backward, step) plus bookkeeping: a log row per step,
# a validation loss every `validate_every` steps and at the last, a checkpoint every
# `checkpoint_every` steps and at the last, resume from the checkpoint continuing the same
# random stream. A method of one weight whose loss draws from the global RNG (as diffusion
# losses draw noise) makes each run take milliseconds.


class _OneWeight(Method):
    """Loss mean((w x̄ - 1 - u)²), x̄ the slice mean, u ~ U(0, 1) from the global RNG; w x̄
    is a matrix product, which bf16 autocast would round (CPU runs train in fp32)."""

    name = "one_weight"
    default_batch_size = 3
    default_learning_rate = 0.05
    scoring_hparams = frozenset({"score_seed"})

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.w = torch.nn.Parameter(torch.tensor([0.5]))
        self.hooks: list[tuple[str, str, float]] = []

    def training_loss(self, batch):
        x = batch["image"].float().mean(dim=(1, 2, 3))
        wx = (x[:, None] @ self.w[None, :])[:, 0]
        return ((wx - 1 - torch.rand(x.shape)) ** 2).mean()

    def to(self, *args, **kwargs):
        self.moved_to = [*getattr(self, "moved_to", []), args]
        return super().to(*args, **kwargs)

    def before_optimizer_step(self, stage="model"):
        self.hooks.append(("before", stage, float(self.w.grad)))

    def after_optimizer_step(self, stage="model"):
        self.hooks.append(("after", stage, float(self.w.detach())))

    def _score(self, images, brainmask, generator):  # pragma: no cover - never scored
        raise NotImplementedError


class _StepDecay(_OneWeight):
    """The same with the learning rate halved every 2 steps."""

    def configure_lr_scheduler(self, optimizer, max_steps, stage="model"):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


class _ScriptedValidation(_OneWeight):
    """Validation losses read from a script (one per validation pass), to place the best."""

    def __init__(self, script=(), **hparams):
        super().__init__(**hparams)
        self.script = list(script)

    def training_loss(self, batch):
        if self.training:
            return super().training_loss(batch)
        return self.w.sum() * 0 + self.script.pop(0)  # one batch per validation here


def _slices(n: int, start: float = 0.0) -> list[dict]:
    """``n`` 1 × 2 × 2 slices of constant intensity (start + i + 1) / n."""
    return [
        {
            "image": torch.full((1, 2, 2), (start + i + 1) / n),
            "brainmask": torch.ones(1, 2, 2),
            "label": i % 2,
            "subject": f"sub-{i}",  # not a tensor: handed on as it is
        }
        for i in range(n)
    ]


def _run(tmp_path, **overrides) -> TrainingRun:
    settings = {
        "checkpoint_path": tmp_path / "ckpt" / "last.pt",
        "log_path": tmp_path / "log.csv",
        "max_steps": 5,
        "batch_size": 3,
        "learning_rate": 0.05,
        "checkpoint_every": 2,
        "validate_every": 2,
        "validation_batches": 1,
        "seed": 3,
        "device": "cpu",
        "progress": False,
    }
    return TrainingRun(**(settings | overrides))


def _reference(data, val, *, steps, batch_size, lr, seed, validate, max_batches, method=None):
    """The plain loop: losses per step, validation losses at the steps in ``validate``,
    and the weight after each step."""
    method = method or _OneWeight()
    seed_everything(seed)
    optimizer = torch.optim.Adam(method.parameters(), lr=lr)
    batches = iter(InfiniteShuffledBatches(len(data), batch_size, seed))
    losses, val_losses, weights = [], {}, []
    for step in range(1, steps + 1):
        batch = default_collate([data[i] for i in next(batches)])
        loss = method.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        weights.append(float(method.w.detach()))
        if step in validate:
            val_losses[step] = validation_loss(
                method,
                val,
                batch_size=batch_size,
                device=torch.device("cpu"),
                seed=seed,
                max_batches=max_batches,
            )
    return losses, val_losses, weights


def test_train_is_the_plain_loop_with_its_bookkeeping(tmp_path, monkeypatch):
    data, val = _slices(7), _slices(5, start=0.5)
    saved = []
    real_save = loop.save_keeping_previous

    def spy(payload, path):
        saved.append((payload["step"], Path(path)))
        real_save(payload, path)

    monkeypatch.setattr(loop, "save_keeping_previous", spy)
    run = _run(tmp_path)
    seen = []
    method = _OneWeight()
    started = time.perf_counter()
    summary = train(
        method,
        data,
        val,
        run,
        data_fingerprint="abc",
        on_step=lambda step, loss: seen.append((step, loss)),
    )
    wall = time.perf_counter() - started
    losses, val_losses, weights = _reference(
        data, val, steps=5, batch_size=3, lr=0.05, seed=3, validate={2, 4, 5}, max_batches=1
    )
    rows = read_log(run.log_path)
    assert list(rows[0]) == list(loop.LOG_COLUMNS)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["train_loss"]) for r in rows] == losses
    assert {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]} == val_losses
    assert [float(r["lr"]) for r in rows] == [0.05] * 5
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert seen == list(enumerate(losses, start=1))
    assert float(method.w.detach()) == weights[-1] and not method.training
    assert [s for s, _ in saved] == [2, 4, 5] and {p for _, p in saved} == {run.checkpoint_path}
    # the hooks: after backward (the gradient is there), around every optimiser step
    assert [h[:2] for h in method.hooks] == [("before", "model"), ("after", "model")] * 5
    assert [h[2] for h in method.hooks if h[0] == "after"] == weights
    assert all(h[2] != 0 for h in method.hooks if h[0] == "before")
    best_step = min(val_losses, key=val_losses.get)
    assert summary == summary | {
        "method": "one_weight",
        "device": "cpu",
        "start_step": 0,
        "resumed": False,
        "batch_size": 3,
        "learning_rate": 0.05,
        "mixed_precision": False,
        "train_slices": 7,
        "data_fingerprint": "abc",
        "checkpoint_path": str(run.checkpoint_path),
        "log_path": str(run.log_path),
        "stage": "model",
        "sampler": "slices",
        "scored_checkpoint": "last",
        "best_step": best_step,
        "best_val_loss": val_losses[best_step],
        "final_step": 5,
        "steps_run": 5,
        "final_train_loss": losses[-1],
        "final_val_loss": val_losses[5],
    }
    assert seconds[-1] - 1e-3 <= summary["seconds"] <= wall  # training time, from zero
    assert method.moved_to == [(torch.device("cpu"),)]  # left on the run's device
    # what the checkpoint holds: the run's identity, state and position in the data stream
    checkpoint = torch.load(run.checkpoint_path, weights_only=True)
    assert checkpoint["format"] == loop.CHECKPOINT_FORMAT
    assert checkpoint["brainuad_version"] == brainuad.__version__
    assert (checkpoint["method"], checkpoint["stage"], checkpoint["step"]) == (
        "one_weight",
        "model",
        5,
    )
    assert checkpoint["hparams"] == {} and checkpoint["sampler"] == "slices"
    assert checkpoint["augmentation"] is None and checkpoint["lr_schedule"] is None
    assert checkpoint["lr_scheduler"] is None
    assert (checkpoint["learning_rate"], checkpoint["mixed_precision"]) == (0.05, False)
    assert float(checkpoint["model"]["w"]) == weights[-1]
    assert checkpoint["optimizer"]["state"][0]["step"] == 5
    assert checkpoint["best"] == {"step": best_step, "val_loss": val_losses[best_step]}
    assert checkpoint["data"] == {
        "seed": 3,
        "batch_size": 3,
        "samples_consumed": 15,
        "train_slices": 7,
        "fingerprint": "abc",
    }
    assert checkpoint["elapsed_seconds"] == pytest.approx(seconds[-1], abs=2e-3)
    assert (checkpoint["last_train_loss"], checkpoint["last_val_loss"]) == (
        losses[-1],
        val_losses[5],
    )
    assert checkpoint["run"]["checkpoint_path"] == str(run.checkpoint_path)
    assert checkpoint["run"]["log_path"] == str(run.log_path) and checkpoint["run"]["seed"] == 3
    # best.pt: the weights at the lowest validation loss, written when it was reached
    best = torch.load(run.best_path, weights_only=True)
    assert best["format"] == loop.BEST_FORMAT and best["method"] == "one_weight"
    assert (best["step"], best["val_loss"]) == (best_step, val_losses[best_step])
    assert float(best["model"]["w"]) == weights[best_step - 1]


def test_train_defaults_from_the_method_and_no_validation(tmp_path):
    data = _slices(7)
    run = _run(tmp_path, batch_size=None, learning_rate=None, validation_batches=None)
    summary = train(_OneWeight(), data, None, run)
    losses, _, _ = _reference(
        data, None, steps=5, batch_size=3, lr=0.05, seed=3, validate=(), max_batches=None
    )
    rows = read_log(run.log_path)
    assert [float(r["train_loss"]) for r in rows] == losses
    assert all(r["val_loss"] == "" for r in rows)
    assert (summary["batch_size"], summary["learning_rate"]) == (3, 0.05)
    assert (summary["best_step"], summary["final_val_loss"]) == (None, None)
    assert not run.best_path.exists()
    # an empty validation set is no validation either; one slice is a validation set
    summary = train(_OneWeight(), data, [], _run(tmp_path / "empty"))
    assert summary["final_val_loss"] is None
    assert train(_OneWeight(), data, data[:1], _run(tmp_path / "one"))["final_val_loss"] > 0


def test_resume_continues_the_same_stream(tmp_path):
    """Killed after step 4 (checkpoint at 3), the re-run drops the log rows after step 3 and
    gives the losses, log and weights of the uninterrupted run."""
    data, val = _slices(7), _slices(5, start=0.5)
    whole = _run(tmp_path / "whole", checkpoint_every=3)
    train(_OneWeight(), data, val, whole)

    def kill(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    cut = _run(tmp_path / "cut", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(_OneWeight(), data, val, cut, on_step=kill)
    assert [r["step"] for r in read_log(cut.log_path)] == ["1", "2", "3", "4"]
    assert torch.load(cut.checkpoint_path, weights_only=True)["step"] == 3
    torch.manual_seed(99)  # whatever the global state, the checkpoint's RNG state is used
    method = _OneWeight()
    summary = train(method, data, val, cut)
    assert (summary["start_step"], summary["resumed"], summary["steps_run"]) == (3, True, 2)
    assert summary["final_step"] == 5

    def columns(path):
        return [(r["step"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_log(path)]

    assert columns(cut.log_path) == columns(whole.log_path)
    expected = torch.load(whole.checkpoint_path, weights_only=True)
    assert float(method.w.detach()) == float(expected["model"]["w"])
    # a finished run re-run only reloads its weights (and trains nothing)
    log_before = cut.log_path.read_text()
    again = _OneWeight()
    summary = train(again, data, val, cut)
    assert (summary["steps_run"], summary["final_step"], summary["resumed"]) == (0, 5, True)
    assert summary["final_train_loss"] == float(read_log(cut.log_path)[-1]["train_loss"])
    assert summary["final_val_loss"] == float(read_log(cut.log_path)[-1]["val_loss"])
    assert summary["best_step"] == expected["best"]["step"]
    assert summary["best_val_loss"] == expected["best"]["val_loss"] is not None
    finished = torch.load(cut.checkpoint_path, weights_only=True)
    assert summary["seconds"] == finished["elapsed_seconds"]
    assert float(again.w.detach()) == float(method.w.detach()) and not again.training
    assert cut.log_path.read_text() == log_before and again.hooks == []


def test_lr_schedule_steps_once_per_step_and_resumes(tmp_path):
    data = _slices(7)
    whole = _run(tmp_path / "whole", max_steps=6)
    train(_StepDecay(), data, None, whole)
    lrs = [float(r["lr"]) for r in read_log(whole.log_path)]
    assert lrs == [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]  # the rate each step used
    checkpoint = torch.load(whole.checkpoint_path, weights_only=True)
    assert checkpoint["lr_schedule"] == {"kind": "StepLR", "max_steps": 6}
    assert checkpoint["lr_scheduler"]["last_epoch"] == 6

    def kill(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    cut = _run(tmp_path / "cut", max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train(_StepDecay(), data, None, cut, on_step=kill)
    train(_StepDecay(), data, None, cut)
    assert [float(r["lr"]) for r in read_log(cut.log_path)] == lrs
    with pytest.raises(InputError, match="lr_schedule"):  # laid out over 6 steps
        train(_StepDecay(), data, None, _run(tmp_path / "cut", max_steps=8))


def test_a_longer_run_without_schedule_extends_the_checkpoint(tmp_path):
    data = _slices(7)
    train(_OneWeight(), data, None, _run(tmp_path / "short", max_steps=3, checkpoint_every=3))
    long_run = _run(tmp_path / "short", max_steps=5, checkpoint_every=3)
    summary = train(_OneWeight(), data, None, long_run)
    assert (summary["start_step"], summary["steps_run"]) == (3, 2)
    whole = _run(tmp_path / "whole", max_steps=5, checkpoint_every=3)
    train(_OneWeight(), data, None, whole)
    assert [r["train_loss"] for r in read_log(long_run.log_path)] == [
        r["train_loss"] for r in read_log(whole.log_path)
    ]


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("seed", {"seed": 4}),
        ("batch_size", {"batch_size": 2}),
        ("learning_rate", {"learning_rate": 0.01}),
        ("sampler", {"sampler": "volumes"}),
        ("augmentation", {"augmentation": {}}),
        ("train_slices", {}),
        ("data_fingerprint", {}),
        ("hparams", {}),
        ("method", {}),
    ],
)
def test_checkpoint_of_another_run_is_refused(tmp_path, key, change):
    data = _Items(6, subjects=list("aabbcc"))
    for item in data.items:
        item["brainmask"] = torch.ones(1, 2, 2)
    train(_OneWeight(score_seed=1), data, None, _run(tmp_path, max_steps=1), data_fingerprint="abc")
    method = _OneWeight(score_seed=5)  # a scoring-only hyperparameter: still the same run
    assert train(method, data, None, _run(tmp_path, max_steps=1), data_fingerprint="abc")["resumed"]
    fingerprint = "other" if key == "data_fingerprint" else "abc"
    if key == "train_slices":
        data = _Items(5, subjects=list("aabbc"))
    if key == "hparams":
        method = _OneWeight(weight_decay=0.1, score_seed=1)
    if key == "method":
        method = type("Other", (_OneWeight,), {"name": "other"})(score_seed=1)
    with pytest.raises(InputError, match=rf"checkpoint has {key}=.*delete the checkpoint"):
        train(
            method, data, None, _run(tmp_path, max_steps=2, **change), data_fingerprint=fingerprint
        )


def test_checkpoint_of_another_format_is_refused(tmp_path):
    from brainuad.io.torchfile import save_torch

    run = _run(tmp_path)
    save_torch({"format": "brainuad.training/2"}, run.checkpoint_path)
    with pytest.raises(InputError, match=r"checkpoint format 'brainuad\.training/2'"):
        train(_OneWeight(), _slices(4), None, run)
    save_torch({"format": "other"}, run.checkpoint_path)
    with pytest.raises(InputError, match="not a brainuad training checkpoint"):
        train(_OneWeight(), _slices(4), None, run)


def test_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    data = _slices(7)
    whole = _run(tmp_path / "whole")
    train(_OneWeight(), data, None, whole)
    run = _run(tmp_path / "cut")
    train(_OneWeight(), data, None, run)  # checkpoints at 2, 4, 5: previous holds step 4
    data_bytes = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data_bytes[: len(data_bytes) // 2])  # killed mid-write
    with caplog.at_level(logging.WARNING):
        summary = train(_OneWeight(), data, None, run)
    assert (summary["start_step"], summary["steps_run"]) == (4, 1)
    previous = run.checkpoint_path.with_name("last.previous.pt")
    assert f"resuming from the previous checkpoint {previous}" in caplog.messages
    assert any(
        r.name == loop.__name__ and "not a readable brainuad training checkpoint" in r.message
        for r in caplog.records
    )
    assert read_log(run.log_path)[-1]["train_loss"] == read_log(whole.log_path)[-1]["train_loss"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(_OneWeight(), data, None, _run(tmp_path / "cut", max_steps=6))
    assert not any("previous" in m for m in caplog.messages)  # the last one is readable


def test_best_weights_are_scored_when_asked(tmp_path, caplog):
    data, val = _slices(7), _slices(3)
    run = _run(tmp_path, score_checkpoint="best", validate_every=1, checkpoint_every=1)
    weights = []
    method = _ScriptedValidation(script=[3.0, 1.0, 1.0, 4.0, 5.0])  # a tie: the first stays
    summary = train(
        method, data, val, run, on_step=lambda step, loss: weights.append(float(method.w.detach()))
    )
    assert (summary["best_step"], summary["best_val_loss"]) == (2, 1.0)
    assert summary["scored_checkpoint"] == "best"
    assert float(method.w.detach()) == weights[1] != weights[-1]
    # a finished run re-run scores the best weights again, and says so
    again = _ScriptedValidation()
    with caplog.at_level(logging.INFO, logger=loop.__name__):
        assert train(again, data, val, run)["best_step"] == 2
    assert float(again.w.detach()) == weights[1]
    assert "scoring the weights of step 2 (lowest validation loss)" in caplog.messages
    # best.pt of another step than the checkpoint's best: refused
    payload = torch.load(run.best_path, weights_only=True)
    loop.save_torch(payload | {"step": 3}, run.best_path)
    with pytest.raises(InputError, match="expected the best weights of step 2, found step 3"):
        train(_ScriptedValidation(), data, val, run)
    run.best_path.unlink()
    with pytest.raises(InputError, match=r"best\.pt: best-validation weights does not exist"):
        train(_ScriptedValidation(), data, val, run)
    with pytest.raises(InputError, match="score_checkpoint 'best' needs validation slices"):
        train(_OneWeight(), data, [], _run(tmp_path / "x", score_checkpoint="best"))


def test_train_refuses_empty_data_unknown_stage_and_infinite_loss(tmp_path):
    with pytest.raises(InputError, match="training set for method 'one_weight' is empty"):
        train(_OneWeight(), [], None, _run(tmp_path))
    with pytest.raises(InputError, match="no stage 'pretrain'"):
        train(_OneWeight(), _slices(4), None, _run(tmp_path), stage="pretrain")
    assert not _run(tmp_path).log_path.exists()
    data = _slices(4)
    data[2]["image"] = torch.full((1, 2, 2), float("inf"))
    with pytest.raises(RuntimeError, match=r"one_weight: training loss is (inf|nan) at step \d"):
        train(_OneWeight(), data, None, _run(tmp_path, batch_size=1))


class _Recorder(_OneWeight):
    """Records the batches it is trained on (images, labels, the process that read them)."""

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.seen: list[dict] = []

    def training_loss(self, batch):
        self.seen.append({"training": self.training, **batch})
        return super().training_loss(batch)


class _PidSlices:
    """Slices that say which process read them."""

    def __init__(self, n):
        self.items = _slices(n)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {**self.items[index], "pid": os.getpid()}


def test_train_uses_the_runs_sampler_augmentation_and_workers(tmp_path):
    data, val = _slices(8), _slices(3)
    balanced = _Recorder()
    labelled = _Items(8, labels=[item["label"] for item in data])
    for index, item in enumerate(labelled.items):
        item.update(data[index])
    train(balanced, labelled, None, _run(tmp_path / "b", batch_size=4, sampler="balanced"))
    assert all(batch["label"].tolist() == [0, 0, 1, 1] for batch in balanced.seen)
    assert all(len(batch["subject"]) == 4 for batch in balanced.seen)
    # intensity augmentation (a random gamma on every slice): training batches only
    augmented = _Recorder()
    settings = {"gamma_p": 1.0, "bias_field_p": 0.0, "blur_p": 0.0, "ghosting_p": 0.0}
    settings["mask_outside_brain"] = True
    for item in data:
        item["brainmask"] = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    run = _run(tmp_path / "a", augmentation=settings, max_steps=2, validate_every=1)
    train(augmented, data, val, run)
    trained = [b for b in augmented.seen if b["training"]]
    validated = [b for b in augmented.seen if not b["training"]]
    assert len(trained) == 2 and len(validated) == 2
    stream = iter(InfiniteShuffledBatches(8, 3, seed=3))
    for batch in trained:
        raw = torch.stack([data[i]["image"] for i in next(stream)])
        assert not torch.equal(batch["image"], raw)
        assert batch["image"][..., 1, 1].eq(0).all() and batch["image"][..., 0, 0].gt(0).all()
    assert all(torch.equal(b["image"], torch.stack([x["image"] for x in val])) for b in validated)
    # DataLoader worker processes read the training slices
    workers = _Recorder()
    run = _run(tmp_path / "w", max_steps=2, num_workers=1, validate_every=1)
    train(workers, _PidSlices(6), _PidSlices(3), run)
    assert {b["training"] for b in workers.seen} == {True, False}
    assert all(os.getpid() not in b["pid"].tolist() for b in workers.seen)


class _TwoStage(_OneWeight):
    """Two stages, each training its own weight; records its schedule requests."""

    stages = (
        Stage("pretrain", modules=("first",)),
        Stage("model", consumes=("pretrain",), modules=("second",)),
    )

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(1, 1, bias=False)
        self.second = torch.nn.Linear(1, 1, bias=False)
        self.schedules: list[tuple[int, str]] = []

    def stage_loss(self, stage, batch):
        self.losses = [*getattr(self, "losses", []), (stage, self.training)]
        x = batch["image"].float().mean(dim=(1, 2, 3))[:, None]
        layer = self.first if stage == "pretrain" else self.second
        return ((layer(x) - 1) ** 2).mean()

    def before_optimizer_step(self, stage="model"):
        self.hooks.append(("before", stage, 0.0))

    def after_optimizer_step(self, stage="model"):
        self.hooks.append(("after", stage, 0.0))

    def configure_lr_scheduler(self, optimizer, max_steps, stage="model"):
        self.schedules.append((max_steps, stage))
        return None


def test_a_stage_trains_its_own_parameters_with_its_own_schedule(tmp_path):
    method = _TwoStage()
    first, second = method.first.weight.clone(), method.second.weight.clone()
    run = _run(tmp_path, max_steps=3)
    summary = train(method, _slices(6), _slices(2), run, stage="pretrain")
    assert not torch.equal(method.first.weight, first)  # the stage's module learns
    assert torch.equal(method.second.weight, second)  # the other is left alone
    assert method.schedules == [(3, "pretrain")]
    assert set(method.losses) == {("pretrain", True), ("pretrain", False)}  # validated too
    assert {h[1] for h in method.hooks} == {"pretrain"} and summary["stage"] == "pretrain"
    assert torch.load(run.checkpoint_path, weights_only=True)["stage"] == "pretrain"


def test_stale_checkpoint_temporaries_are_removed_and_logged(tmp_path, caplog):
    run = _run(tmp_path, max_steps=1)
    run.checkpoint_path.parent.mkdir(parents=True)
    stale = run.checkpoint_path.parent / f".{run.checkpoint_path.name}.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger=loop.__name__):
        train(_OneWeight(), _slices(4), None, run)
    assert not stale.exists()
    assert f"removed {stale}, left by a job killed while writing a checkpoint" in caplog.messages


class _SometimesUnused(_OneWeight):
    """A second weight that only odd steps' losses use."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor([0.5]))
        self.calls, self.v_after = 0, []

    def training_loss(self, batch):
        self.calls += 1
        loss = super().training_loss(batch)
        return loss + (self.v.square().sum() if self.calls % 2 else 0)

    def after_optimizer_step(self, stage="model"):
        self.v_after.append(float(self.v.detach()))


def test_a_weight_without_gradient_in_a_step_stays_put(tmp_path):
    """Gradients are reset to None before each step, so Adam leaves a weight that the
    step's loss does not use where it is (zeroed gradients would move it on momentum)."""
    method = _SometimesUnused()
    train(method, _slices(6), None, _run(tmp_path, max_steps=4))
    first, second, third, fourth = method.v_after
    assert first < 0.5 and second == first and third < second and fourth == third


def test_progress_bar_shows_the_stage_and_the_steps(tmp_path, capsys, monkeypatch):
    # tqdm's default lock is a process-shared semaphore and it starts a monitor thread: a
    # process forked while either holds it (mutation runs fork each test run) would hang
    monkeypatch.setattr(loop.tqdm, "monitor_interval", 0)
    monkeypatch.setattr(loop.tqdm, "_lock", threading.RLock(), raising=False)
    train(
        _TwoStage(),
        _slices(6),
        None,
        _run(tmp_path / "p", max_steps=3, progress=True),
        stage="pretrain",
    )
    shown = capsys.readouterr().err
    assert "train one_weight (pretrain)" in shown and "3/3" in shown
    train(_OneWeight(), _slices(6), _slices(2), _run(tmp_path / "m", max_steps=2, progress=True))
    shown = capsys.readouterr().err
    assert "train one_weight:" in shown and "2/2" in shown and "(model)" not in shown
    assert re.search(r"loss=\d\.\d{4}, val=\d\.\d{4}", shown)  # 4 decimals
    train(_OneWeight(), _slices(6), None, _run(tmp_path / "q", max_steps=2))
    assert capsys.readouterr().err == ""

    # resumed: the bar starts at the checkpoint's step
    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    run = _run(tmp_path / "r", max_steps=4, progress=True)
    with pytest.raises(KeyboardInterrupt):
        train(_OneWeight(), _slices(6), None, run, on_step=stop)
    capsys.readouterr()
    train(_OneWeight(), _slices(6), None, run)
    shown = capsys.readouterr().err
    assert "2/4" in shown and "1/4" not in shown and "4/4" in shown
