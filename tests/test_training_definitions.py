"""The training loop's samplers, validation and bookkeeping against their definitions, with
no model training: epoch ``e`` is ``torch.randperm`` seeded with ``seed + e`` (so epochs draw
different orders), batches run across epoch boundaries, validation is seeded and leaves the
training random stream as it was, and the RNG state of a checkpoint restores every stream."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brainuad.errors import InputError
from brainuad.training import loop
from brainuad.training.loop import (
    InfiniteBalancedBatches,
    InfiniteShuffledBatches,
    InfiniteVolumeBatches,
    TrainingRun,
    make_batch_sampler,
    read_log,
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
    with pytest.raises(InputError, match="'volumes' needs a dataset with subject ids"):
        make_batch_sampler("volumes", _Items(2), 2, 0, 0)
    with pytest.raises(InputError, match="'balanced' needs a dataset with slice labels"):
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
