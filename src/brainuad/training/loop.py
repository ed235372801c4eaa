"""The one training loop shared by every method: step-based, seeded, checkpointed, resumable.

``train(method, train_dataset, val_dataset, run, stage=...)`` trains one stage of a method
(:class:`brainuad.methods.base.Stage`) with the stage's loss, parameters, optimiser and
learning-rate schedule. It draws batches from an infinite, seeded sampler, so a run is defined
by its number of optimiser steps (the caller converts the reference's epochs into steps). The
sampler is a setting: ``slices`` (epoch ``e`` is a permutation of the slices seeded by
``seed + e``), ``volumes`` (the cDDPM reference's epoch: one random slice of every training
volume) or ``balanced`` (as many lesion as healthy slices per batch, by slice label).
Optional intensity augmentation (:mod:`brainuad.augment`) is applied to training batches only.
Around every optimiser step the loop calls the method's hooks ``before_optimizer_step(stage)``
(gradient clipping: the ``gradient_clip_norm`` hyperparameter) and
``after_optimizer_step(stage)`` (e.g. EMA weights, :mod:`brainuad.training.ema`).

Every ``checkpoint_every`` steps and at the end it
writes a checkpoint atomically; re-running the same call after a kill resumes from the last
checkpoint with the step counter, optimiser, RNG states and data order restored, so an
interrupted run gives the same losses as an uninterrupted one. Re-running a finished run only
reloads its weights. A checkpoint is used only if it was made by the same run: same method,
hyperparameters (except those that only affect scoring, ``Method.scoring_hparams``), seed,
batch size, learning rate, mixed precision and training data (number of slices and the
caller's ``data_fingerprint``); otherwise it is refused rather than silently continued.

The CSV log (``step, train_loss, val_loss, seconds, lr``) gets one row per step; on resume,
rows after the checkpoint's step (written before the kill) are dropped, so steps are never
duplicated. ``val_loss`` is the mean training loss over the validation slices, computed with a
fixed seed every ``validate_every`` steps and at the last step (empty otherwise).
"""

from __future__ import annotations

import csv
import io
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

import brainuad
from brainuad.errors import InputError
from brainuad.io.atomic import remove_stale_temporaries, write_text_atomic
from brainuad.io.torchfile import (
    load_newest_readable,
    load_torch,
    save_keeping_previous,
    save_torch,
)
from brainuad.provenance import seed_everything
from brainuad.training.device import DeviceName, check_device_name, resolve_device

if TYPE_CHECKING:
    from brainuad.methods.base import Method

_LOGGER = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "brainuad.training/3"
BEST_FORMAT = "brainuad.training-best/1"
Sampler_ = Literal["slices", "volumes", "balanced"]
LOG_COLUMNS = ("step", "train_loss", "val_loss", "seconds", "lr")


@dataclass
class TrainingRun:
    """Everything about a training run that is not the method itself.

    Attributes:
        checkpoint_path: training checkpoint (model, optimiser, step, RNG and data state);
            resumed from when it exists.
        log_path: CSV log of losses.
        max_steps: optimiser steps in total (including steps done before a resume).
        batch_size: slices per step; None: the method's ``default_batch_size``.
        learning_rate: None: the method's ``default_learning_rate``.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        validate_every: steps between validation losses (also computed at the last step).
        validation_batches: validate on at most this many batches (None: all val slices).
        seed: seeds Python, NumPy, torch and the data order.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:<index>"``.
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar.
        mixed_precision: bf16 autocast (CUDA only; CPU always trains in fp32).
        sampler: ``"slices"``, ``"volumes"`` or ``"balanced"`` (module docstring); the
            dataset must provide ``subjects`` (volumes) or ``labels`` (balanced) per item.
        augmentation: intensity augmentation settings (:mod:`brainuad.augment`), or None.
        score_checkpoint: which weights the run returns: ``"last"`` or ``"best"`` (lowest
            validation loss, kept in ``best.pt`` next to the checkpoint; the cDDPM
            reference scores the best).
    """

    checkpoint_path: Path
    log_path: Path
    max_steps: int
    batch_size: int | None = None
    learning_rate: float | None = None
    checkpoint_every: int = 500
    validate_every: int = 500
    validation_batches: int | None = None
    seed: int = 0
    device: DeviceName = "auto"
    num_workers: int = 0
    progress: bool = True
    mixed_precision: bool = True
    sampler: Sampler_ = "slices"
    augmentation: dict[str, Any] | None = None
    score_checkpoint: Literal["last", "best"] = "last"

    def __post_init__(self) -> None:
        self.checkpoint_path = Path(self.checkpoint_path)
        self.log_path = Path(self.log_path)
        positive = {
            "max_steps": self.max_steps,
            "checkpoint_every": self.checkpoint_every,
            "validate_every": self.validate_every,
        }
        if self.batch_size is not None:
            positive["batch_size"] = self.batch_size
        if self.validation_batches is not None:
            positive["validation_batches"] = self.validation_batches
        for field, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"TrainingRun.{field}={value!r}, expected an integer ≥ 1")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise InputError(f"TrainingRun.learning_rate={self.learning_rate!r}, expected > 0")
        if self.num_workers < 0:
            raise InputError(f"TrainingRun.num_workers={self.num_workers!r}, expected ≥ 0")
        check_device_name(self.device)
        if self.sampler not in ("slices", "volumes", "balanced"):
            raise InputError(
                f"training.sampler={self.sampler!r}, expected 'slices', 'volumes' or 'balanced'"
            )
        if self.score_checkpoint not in ("last", "best"):
            raise InputError(
                f"training.score_checkpoint={self.score_checkpoint!r}, expected 'last' or 'best'"
            )

    @property
    def best_path(self) -> Path:
        """Weights with the lowest validation loss so far, next to the checkpoint."""
        return self.checkpoint_path.with_name("best.pt")


class InfiniteShuffledBatches(Sampler[list[int]]):
    """Endless batches of dataset indices; epoch ``e`` is a permutation seeded by ``seed + e``.

    Batches run across epoch boundaries. ``start_sample`` (samples already consumed) makes
    the stream resume exactly where a previous run stopped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_sample: int = 0) -> None:
        self.size, self.batch_size = int(size), int(batch_size)
        self.seed, self.start_sample = int(seed), int(start_sample)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_sample, self.size)
        batch: list[int] = []
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            for index in order[offset:]:
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def _permutation(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


class InfiniteVolumeBatches(Sampler[list[int]]):
    """Endless batches in which an epoch is one random slice of every volume (subject).

    The cDDPM reference's epoch: with 387 training volumes and batch 32 an epoch is about 12
    steps. Epoch ``e`` (seeded by ``seed + e``) picks one slice per subject and shuffles the
    subjects; batches run across epoch boundaries; ``start_sample`` resumes the stream.
    """

    def __init__(
        self, subjects: Sequence[str], batch_size: int, seed: int, start_sample: int = 0
    ) -> None:
        groups: dict[str, list[int]] = {}
        for index, subject in enumerate(subjects):
            groups.setdefault(str(subject), []).append(index)
        self.groups = [groups[s] for s in sorted(groups)]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.start_sample = int(start_sample)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.groups)
        epoch, offset = divmod(self.start_sample, n)
        batch: list[int] = []
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
            picks = torch.randint(0, 2**62, (n,), generator=generator).tolist()
            for position in order[offset:]:
                group = self.groups[position]
                batch.append(group[picks[position] % len(group)])
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


class InfiniteBalancedBatches(Sampler[list[int]]):
    """Endless batches with ``batch_size // 2`` lesion slices (label 1) and the rest healthy.

    Each class is its own endless stream of seeded permutations (epoch ``e`` of class ``k``
    seeded by ``seed + 2 e + k``), so the stream resumes exactly from ``start_sample``.

    Raises:
        InputError: when either class has no slice.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, seed: int, start_sample: int = 0
    ) -> None:
        labels = np.asarray(labels).astype(bool)
        self.classes = [np.flatnonzero(~labels).tolist(), np.flatnonzero(labels).tolist()]
        if not self.classes[0] or not self.classes[1]:
            raise InputError(
                f"balanced sampling needs healthy and lesion slices; got "
                f"{len(self.classes[0])} healthy and {len(self.classes[1])} lesion slices"
            )
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.per_class = [self.batch_size - self.batch_size // 2, self.batch_size // 2]
        steps = int(start_sample) // self.batch_size
        self.start = [steps * k for k in self.per_class]

    def _stream(self, k: int) -> Iterator[int]:
        members = self.classes[k]
        epoch, offset = divmod(self.start[k], len(members))
        while True:
            for position in _permutation(len(members), self.seed + 2 * epoch + k)[offset:]:
                yield members[position]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._stream(0), self._stream(1)]
        while True:
            yield [next(streams[k]) for k in (0, 1) for _ in range(self.per_class[k])]


def make_batch_sampler(
    kind: Sampler_, dataset: Dataset, batch_size: int, seed: int, start_sample: int
) -> Sampler[list[int]]:
    """The endless batch sampler ``kind`` over ``dataset`` (``TrainingRun.sampler``)."""
    if kind == "volumes":
        subjects = getattr(dataset, "subjects", None)
        if subjects is None:
            raise InputError("training.sampler 'volumes' needs a dataset with subject ids")
        return InfiniteVolumeBatches(subjects, batch_size, seed, start_sample)
    if kind == "balanced":
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise InputError("training.sampler 'balanced' needs a dataset with slice labels")
        return InfiniteBalancedBatches(labels, batch_size, seed, start_sample)
    return InfiniteShuffledBatches(len(dataset), batch_size, seed, start_sample)


def train(
    method: Method,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    run: TrainingRun,
    *,
    stage: str = "model",
    data_fingerprint: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``stage`` of ``method`` for ``run.max_steps`` steps, resuming from
    ``run.checkpoint_path``.

    Seed the global RNGs (``seed_everything``) before building the method, so that its
    initial weights are reproducible too; this function seeds everything after that.
    A checkpoint at or beyond ``run.max_steps`` only reloads the weights (no training); a
    larger ``max_steps`` than before extends the run (unless the method has a learning-rate
    schedule, which is laid out over the run's length). A checkpoint made with another method,
    other hyperparameters (scoring-only ones aside), seed, batch size, learning rate, mixed
    precision, number of training slices or ``data_fingerprint`` is refused (InputError):
    resuming it would silently mix two runs, and returning its weights would misreport
    what they were trained with.

    Args:
        method: a built method (weights are trained in place; it is left on the device).
        train_dataset: items as from ``SliceDataset`` (``image`` ``[C, H, W]``,
            ``brainmask`` ``[1, H, W]``, ...).
        val_dataset: healthy validation slices, or None for no validation loss.
        run: the run settings.
        stage: the stage trained (``Method.stages``): its loss, parameters, optimiser and
            schedule are used; the checkpoint records it.
        data_fingerprint: identity of the training data (e.g. from
            :func:`brainuad.training.fold.training_data_fingerprint`), stored in the
            checkpoint and compared on resume; None checks only the number of slices.
        on_step: called as ``on_step(step, train_loss)`` after each step (and after its
            checkpoint); for tests and monitoring.

    Returns:
        A summary: method, device, start_step, final_step, steps_run, resumed,
        final_train_loss, final_val_loss, seconds (training wall time over all sessions),
        batch_size, learning_rate, mixed_precision (bf16 autocast in use), train_slices,
        data_fingerprint, checkpoint_path, log_path, stage, sampler, best_step,
        best_val_loss, scored_checkpoint (``"last"`` or ``"best"``).
    """
    if len(train_dataset) == 0:
        raise InputError(f"training set for method {method.name!r} is empty")
    device = resolve_device(run.device)
    batch_size = run.batch_size or method.default_batch_size
    learning_rate = run.learning_rate or method.default_learning_rate
    method.stage(stage)  # an unknown stage fails here, before any work
    if run.score_checkpoint == "best" and (val_dataset is None or len(val_dataset) == 0):
        raise InputError(
            f"{method.name} stage {stage!r}: score_checkpoint 'best' needs validation slices"
        )
    seed_everything(run.seed)
    method.to(device)
    optimizer = method.configure_optimizer(learning_rate, stage)
    scheduler = method.configure_lr_scheduler(optimizer, run.max_steps, stage)
    augment = _build_augmentation(run.augmentation)
    use_amp = device.type == "cuda" and run.mixed_precision

    # A job killed mid-checkpoint leaves a full-size temporary behind; this run owns the file.
    for stale in remove_stale_temporaries(run.checkpoint_path):
        _LOGGER.info("removed %s, left by a job killed while writing a checkpoint", stale)
    identity = {
        "method": method.name,
        "stage": stage,
        "hparams": _training_hparams(method, method.hparams),
        "seed": run.seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "mixed_precision": use_amp,
        "train_slices": len(train_dataset),
        "data_fingerprint": data_fingerprint,
        "sampler": run.sampler,
        "augmentation": run.augmentation,
        # A schedule is laid out over the run's length (cosine annealing's T_max): a resumed
        # run of another length would silently follow the old schedule, so it is refused.
        "lr_schedule": None
        if scheduler is None
        else {"kind": type(scheduler).__name__, "max_steps": run.max_steps},
    }
    checkpoint = _read_checkpoint(run.checkpoint_path, method, identity)
    start_step, elapsed = 0, 0.0
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    best: dict[str, Any] = {"step": None, "val_loss": None}
    if checkpoint is not None:
        method.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
        best = dict(checkpoint["best"])
        start_step = int(checkpoint["step"])
        elapsed = float(checkpoint["elapsed_seconds"])
        last_train_loss = checkpoint["last_train_loss"]
        last_val_loss = checkpoint["last_val_loss"]

    summary: dict[str, Any] = {
        "method": method.name,
        "device": str(device),
        "start_step": start_step,
        "resumed": checkpoint is not None,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "mixed_precision": use_amp,
        "train_slices": len(train_dataset),
        "data_fingerprint": data_fingerprint,
        "checkpoint_path": str(run.checkpoint_path),
        "log_path": str(run.log_path),
        "stage": stage,
        "sampler": run.sampler,
        "scored_checkpoint": run.score_checkpoint,
    }
    if start_step >= run.max_steps:
        _use_scored_weights(method, run, best)
        method.eval()
        return summary | {
            "best_step": best["step"],
            "best_val_loss": best["val_loss"],
            "final_step": start_step,
            "steps_run": 0,
            "final_train_loss": last_train_loss,
            "final_val_loss": last_val_loss,
            "seconds": elapsed,
        }

    _prepare_log(run.log_path, keep_until=start_step if checkpoint is not None else None)
    loader = DataLoader(
        train_dataset,
        batch_sampler=make_batch_sampler(
            run.sampler, train_dataset, batch_size, run.seed, start_step * batch_size
        ),
        num_workers=run.num_workers,
        pin_memory=device.type == "cuda",
        # Worker seeds come from this generator, not the global RNG, so creating the
        # iterator does not shift the random numbers the method draws.
        generator=torch.Generator().manual_seed(run.seed),
    )
    batches = iter(loader)
    if checkpoint is not None:
        _set_rng_state(checkpoint["rng"])

    method.train()
    bar = tqdm(
        total=run.max_steps,
        initial=start_step,
        disable=not run.progress,
        desc=f"train {method.name}" + ("" if stage == "model" else f" ({stage})"),
        dynamic_ncols=True,
    )
    session_start = time.perf_counter()
    step = start_step
    try:
        with run.log_path.open("a", newline="") as log_file:
            log = csv.writer(log_file)
            for step in range(start_step + 1, run.max_steps + 1):
                batch = _to_device(next(batches), device)
                if augment is not None:
                    batch["image"] = augment(batch["image"], batch["brainmask"])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = method.stage_loss(stage, batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"{method.name}: training loss is {loss.item()} at step {step}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                method.before_optimizer_step(stage)  # e.g. gradient clipping
                optimizer.step()
                method.after_optimizer_step(stage)  # e.g. EMA weights
                current_lr = optimizer.param_groups[0]["lr"]
                if scheduler is not None:
                    scheduler.step()
                last_train_loss = float(loss.detach())

                val_loss: float | None = None
                if (
                    val_dataset is not None
                    and len(val_dataset) > 0
                    and (step % run.validate_every == 0 or step == run.max_steps)
                ):
                    val_loss = validation_loss(
                        method,
                        val_dataset,
                        batch_size=batch_size,
                        device=device,
                        seed=run.seed,
                        max_batches=run.validation_batches,
                        mixed_precision=use_amp,
                        num_workers=run.num_workers,
                        stage=stage,
                    )
                    last_val_loss = val_loss
                    if best["val_loss"] is None or val_loss < best["val_loss"]:
                        best = {"step": step, "val_loss": val_loss}
                        _write_best(run, method, step=step, val_loss=val_loss)
                seconds = elapsed + time.perf_counter() - session_start
                log.writerow(
                    [
                        step,
                        repr(last_train_loss),
                        "" if val_loss is None else repr(val_loss),
                        f"{seconds:.3f}",
                        repr(current_lr),
                    ]
                )
                log_file.flush()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_train_loss:.4f}",
                    **({} if last_val_loss is None else {"val": f"{last_val_loss:.4f}"}),
                )
                if step % run.checkpoint_every == 0 or step == run.max_steps:
                    _write_checkpoint(
                        run,
                        method,
                        optimizer,
                        scheduler,
                        step=step,
                        best=best,
                        identity=identity,
                        elapsed=seconds,
                        last_train_loss=last_train_loss,
                        last_val_loss=last_val_loss,
                    )
                if on_step is not None:
                    on_step(step, last_train_loss)
    finally:
        bar.close()
    _use_scored_weights(method, run, best)
    method.eval()
    return summary | {
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "final_step": step,
        "steps_run": step - start_step,
        "final_train_loss": last_train_loss,
        "final_val_loss": last_val_loss,
        "seconds": elapsed + time.perf_counter() - session_start,
    }


@torch.no_grad()
def validation_loss(
    method: Method,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    max_batches: int | None = None,
    mixed_precision: bool = False,
    num_workers: int = 0,
    stage: str = "model",
) -> float:
    """Mean loss of ``stage`` over ``dataset`` (in order, eval mode, RNG seeded with ``seed``).

    The global RNG state is restored afterwards, so validating does not change training.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = method.training
    method.eval()
    total, count = 0.0, 0
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                batch = _to_device(batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                    loss = method.stage_loss(stage, batch)
                n = int(batch["image"].shape[0])
                total += float(loss) * n
                count += n
    finally:
        method.train(was_training)
    return total / max(count, 1)


def read_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a training log as dicts of strings (columns ``LOG_COLUMNS``)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


# -- helpers -------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {
        key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def _prepare_log(path: Path, keep_until: int | None) -> None:
    """Start a fresh log (``keep_until`` None) or keep only rows up to step ``keep_until``."""
    rows: list[list[str]] = []
    if keep_until is not None and path.exists():
        rows = [
            [row[c] or "" for c in LOG_COLUMNS]
            for row in read_log(path)
            if row.get("step") and int(row["step"]) <= keep_until
        ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(LOG_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _get_rng_state() -> dict[str, Any]:
    # Stored as tensors and plain Python values so the checkpoint loads with weights_only.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _build_augmentation(settings: dict[str, Any] | None):
    """The intensity augmentation of ``settings`` (None: none; ``{}``: the reference's)."""
    if settings is None:
        return None
    from brainuad.augment import build_intensity_augmentation

    return build_intensity_augmentation(settings)


def _write_best(run: TrainingRun, method: Method, *, step: int, val_loss: float) -> None:
    payload = {
        "format": BEST_FORMAT,
        "method": method.name,
        "step": step,
        "val_loss": val_loss,
        "model": {k: v.detach().cpu() for k, v in method.state_dict().items()},
    }
    save_torch(payload, run.best_path)


def _use_scored_weights(method: Method, run: TrainingRun, best: dict[str, Any]) -> None:
    """Load the best-validation weights into ``method`` when the run scores them."""
    if run.score_checkpoint != "best":
        return
    payload = load_torch(run.best_path, "best-validation weights")
    if payload.get("format") != BEST_FORMAT or payload.get("step") != best["step"]:
        raise InputError(
            f"{run.best_path}: expected the best weights of step {best['step']}, found step "
            f"{payload.get('step')}; delete the checkpoint folder {run.checkpoint_path.parent}"
        )
    method.load_state_dict(payload["model"])
    _LOGGER.info("scoring the weights of step %s (lowest validation loss)", best["step"])


def _write_checkpoint(
    run: TrainingRun,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    step: int,
    best: dict[str, Any],
    identity: dict[str, Any],
    elapsed: float,
    last_train_loss: float | None,
    last_val_loss: float | None,
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "brainuad_version": brainuad.__version__,
        "method": method.name,
        "hparams": method.hparams,
        "step": step,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": None if scheduler is None else scheduler.state_dict(),
        "best": best,
        "stage": identity["stage"],
        "sampler": identity["sampler"],
        "augmentation": identity["augmentation"],
        "lr_schedule": identity["lr_schedule"],
        "rng": _get_rng_state(),
        "learning_rate": identity["learning_rate"],
        "mixed_precision": identity["mixed_precision"],
        "data": {
            "seed": run.seed,
            "batch_size": identity["batch_size"],
            "samples_consumed": step * identity["batch_size"],
            "train_slices": identity["train_slices"],
            "fingerprint": identity["data_fingerprint"],
        },
        "elapsed_seconds": elapsed,
        "last_train_loss": last_train_loss,
        "last_val_loss": last_val_loss,
        "run": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()},
    }
    save_keeping_previous(payload, run.checkpoint_path)


def _training_hparams(method: Method, hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` without those that only affect scoring (they may change between runs)."""
    return {k: v for k, v in hparams.items() if k not in method.scoring_hparams}


def _read_checkpoint(path: Path, method: Method, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, after checking it was made by the run
    described by ``identity`` (the keys built in :func:`train`). A damaged ``path`` is moved
    aside and the previous checkpoint (``last.previous.pt``) used instead, with a warning
    (:func:`brainuad.io.torchfile.load_newest_readable`)."""
    run_path = path
    loaded = load_newest_readable(path, "brainuad training checkpoint", _LOGGER)
    if loaded is None:
        return None
    payload, path = loaded
    if path != run_path:
        _LOGGER.warning("resuming from the previous checkpoint %s", path)
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith(
        "brainuad.training/"
    ):
        raise InputError(f"{path}: not a brainuad training checkpoint ({CHECKPOINT_FORMAT})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path}: checkpoint format {payload['format']!r}, this version reads "
            f"{CHECKPOINT_FORMAT!r}; delete the checkpoint folder {path.parent} to start over"
        )
    data = payload["data"]
    found = {
        "method": payload["method"],
        "stage": payload["stage"],
        "sampler": payload["sampler"],
        "augmentation": payload["augmentation"],
        "lr_schedule": payload["lr_schedule"],
        "hparams": _training_hparams(method, payload["hparams"]),
        "seed": data["seed"],
        "batch_size": data["batch_size"],
        "learning_rate": payload["learning_rate"],
        "mixed_precision": payload["mixed_precision"],
        "train_slices": data["train_slices"],
        "data_fingerprint": data["fingerprint"],
    }
    for key, value in identity.items():
        if found[key] != value:
            raise InputError(
                f"{path}: checkpoint has {key}={found[key]!r} but this run has {value!r}; "
                f"delete the checkpoint folder {path.parent} to start over"
            )
    return payload
