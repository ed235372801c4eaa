"""The contract every anomaly-detection method fulfils.

A method is a ``torch.nn.Module`` with keyword-only hyperparameters, one or more trained
**stages** (each a loss on a batch of slices and the parameters it trains), and a
deterministic scoring function that turns slices into pixel-wise anomaly maps. Training
itself is not the method's business: the workflow trains every stage with the one shared
loop (:func:`brainuad.training.fold.train_fold` → :func:`brainuad.training.loop.train`),
in the order the stages declare, each stage its own Snakemake job. A method with no stage
(a training-free baseline) is built from its hyperparameters and scored directly.

Shapes: ``B`` batch, ``C`` sequences (channels), ``H`` × ``W`` slice size. Images are
normalised to [0, 1] with 0 outside the brain.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

import brainuad
from brainuad.errors import InputError
from brainuad.io.torchfile import load_torch, save_torch

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

CHECKPOINT_FORMAT = "brainuad.method/1"
#: The name of the last stage of every trained method: its file is ``model.pt``.
FINAL_STAGE = "model"
Supervision = Literal["healthy", "image_labels"]


@dataclass(frozen=True)
class Stage:
    """One trained stage of a method: one Snakemake job, one run of the shared loop.

    Attributes:
        name: the stage's name; the last stage of a method is always ``"model"``
            (``FINAL_STAGE``), written to ``model.pt``; an earlier stage ``s`` is written to
            ``{s}.pt`` next to it.
        consumes: earlier stages whose trained modules this stage starts from (their files
            are inputs of this stage's job, and ``Method.load_stage`` copies the modules in).
        modules: names of the submodules this stage trains and hands on to later stages;
            empty: the whole method.
        supervision: the data this stage reads: ``"healthy"`` (healthy slices only) or
            ``"image_labels"`` (healthy and lesion slices with their slice labels); None: the
            method's ``supervision``.
    """

    name: str
    consumes: tuple[str, ...] = ()
    modules: tuple[str, ...] = field(default=())
    supervision: Supervision | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """What ``Method.score`` returns.

    Attributes:
        anomaly_map: float32 ``[B, H, W]``, raw (no masking, filtering or thresholding).
        reconstruction: float32 ``[B, C, H, W]`` pseudo-healthy image, or None for methods
            that do not reconstruct.
    """

    anomaly_map: torch.Tensor
    reconstruction: torch.Tensor | None = None


class Method(torch.nn.Module, abc.ABC):
    """Base class of all methods; subclasses register with ``@register("name")``.

    Subclasses define a keyword-only constructor whose arguments are the hyperparameters,
    call ``super().__init__(**hyperparameters)`` first (stored in ``self.hparams`` and saved
    with the weights), and implement :meth:`training_loss` and :meth:`_score`. A method of
    several stages declares them in ``stages`` and implements :meth:`stage_loss` (and, where
    a stage trains only part of the method, names that part in ``Stage.modules``). The loop
    calls :meth:`before_optimizer_step` (gradient clipping) and :meth:`after_optimizer_step`
    (e.g. EMA weights) around every optimiser step.

    Class attributes:
        name: the registry name (set by ``register``).
        supervision: ``"healthy"`` (trained on healthy slices only; the workflow never hands
            it a lesion cohort for training) or ``"image_labels"`` (trained on the training
            subjects of lesion cohorts too, with slice-level labels).
        stages: the trained stages, in training order; the last is named ``"model"``. An
            empty tuple: the method needs no training (it is built and scored directly).
        has_reconstruction: whether ``score`` returns a reconstruction.
        default_learning_rate, default_batch_size: the paper's values, used when the
            ``TrainingRun`` leaves them unset.
        scoring_hparams: hyperparameters that only affect scoring, not the weights (e.g. a
            noise level or seed used at test time). The training loop leaves them out when
            it checks that a checkpoint belongs to the run, so changing one re-scores
            without retraining; the saved model carries the current values.
    """

    name: ClassVar[str] = ""
    supervision: ClassVar[Supervision] = "healthy"
    stages: ClassVar[tuple[Stage, ...]] = (Stage(FINAL_STAGE),)
    has_reconstruction: ClassVar[bool] = True
    default_learning_rate: ClassVar[float] = 1e-4
    default_batch_size: ClassVar[int] = 32
    scoring_hparams: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(hparams)

    # -- training --------------------------------------------------------------------------

    @classmethod
    def stage(cls, name: str) -> Stage:
        """The declared stage called ``name`` (InputError listing the stages otherwise)."""
        for stage in cls.stages:
            if stage.name == name:
                return stage
        raise InputError(
            f"method {cls.name!r} has no stage {name!r}; stages: {[s.name for s in cls.stages]}"
        )

    @classmethod
    def stage_supervision(cls, name: str) -> Supervision:
        """What stage ``name`` trains on: its own ``supervision`` or the method's."""
        return cls.stage(name).supervision or cls.supervision

    @abc.abstractmethod
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of the final stage (``"model"``) on a collated batch of slices.

        Args:
            batch: ``image`` float32 ``[B, C, H, W]`` in [0, 1] and ``brainmask`` float32
                ``[B, 1, H, W]``, on the model's device; also ``label`` ``[B]`` (1: the
                slice has a lesion; read it only in ``image_labels`` stages), ``row``.
        """

    def stage_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of ``stage`` on a batch (see :meth:`training_loss` for the batch).

        The default serves one-stage methods; a method of several stages overrides it.
        """
        if stage != FINAL_STAGE:
            raise InputError(f"method {self.name!r}: no loss for stage {stage!r}")
        return self.training_loss(batch)

    def stage_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        """Parameters trained by ``stage``: those of its ``modules``, or all of them, less
        frozen ones (``requires_grad`` False, e.g. EMA copies)."""
        modules = self.stage(stage).modules
        if not modules:
            return [p for p in self.parameters() if p.requires_grad]
        return [p for name in modules for p in self.get_submodule(name).parameters()]

    def configure_optimizer(
        self, learning_rate: float, stage: str = FINAL_STAGE
    ) -> torch.optim.Optimizer:
        """The optimiser of ``stage``, from the ``optimizer`` and ``weight_decay``
        hyperparameters, over :meth:`stage_parameters`."""
        kind = self.hparams.get("optimizer", "adam")
        weight_decay = float(self.hparams.get("weight_decay", 0.0))
        parameters = self.stage_parameters(stage)
        if kind == "adam":
            return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
        if kind == "adamw":
            return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
        raise InputError(f"method {self.name!r}: optimizer {kind!r}, expected 'adam' or 'adamw'")

    def configure_lr_scheduler(
        self, optimizer: torch.optim.Optimizer, max_steps: int, stage: str = FINAL_STAGE
    ) -> LRScheduler | None:
        """The learning-rate schedule of ``stage`` over a run of ``max_steps`` steps, or None
        (constant).

        The loop saves its state in the training checkpoint, so a resumed run continues it.
        """
        return None

    def before_optimizer_step(self, stage: str = FINAL_STAGE) -> None:
        """Called by the training loop after ``backward`` and before ``optimizer.step()``.

        The default clips the gradient norm of :meth:`stage_parameters` to the
        ``gradient_clip_norm`` hyperparameter when a method has one (None or 0: no clipping),
        as the references that clip do (``torch.nn.utils.clip_grad_norm_``).
        """
        max_norm = self.hparams.get("gradient_clip_norm")
        if max_norm:
            torch.nn.utils.clip_grad_norm_(self.stage_parameters(stage), float(max_norm))

    def after_optimizer_step(self, stage: str = FINAL_STAGE) -> None:
        """Called by the training loop after every ``optimizer.step()`` of ``stage``.

        The place for weight averaging: a method that scores exponential-moving-average
        weights (:class:`brainuad.training.ema.EMAWeights`, a submodule, so it is saved,
        checkpointed and resumed with the rest) updates them here. Default: nothing.
        """

    def load_stage(self, stage: str, path: str | os.PathLike) -> None:
        """Start from the modules that earlier stage ``stage`` trained, read from its file.

        Copies the state of ``Stage.modules`` of ``stage`` (the whole method when it names
        none) from the method saved at ``path``, which must be this same method.
        """
        path = Path(path)
        payload = read_method_file(path)
        if payload["name"] != self.name:
            raise InputError(
                f"{path}: stage file of method {payload['name']!r}, expected {self.name!r}"
            )
        modules = self.stage(stage).modules
        state = payload["state_dict"]
        if not modules:
            load_matching_state(self, state, path, "this method")
            return
        for module in modules:
            prefix = f"{module}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise InputError(f"{path}: no weights of module {module!r} (stage {stage!r})")
            load_matching_state(self.get_submodule(module), part, path, f"module {module!r}")

    # -- scoring ---------------------------------------------------------------------------

    @property
    def score_seed(self) -> int:
        """Seed of the generator handed to ``_score`` (the ``score_seed`` hyperparameter)."""
        return int(self.hparams.get("score_seed", 0))

    @torch.no_grad()
    def score(self, images: torch.Tensor, brainmask: torch.Tensor) -> ScoreOutput:
        """Anomaly maps for a batch, deterministic for a given model and batch.

        Runs in eval mode without gradients. Any noise is drawn from a generator seeded
        with ``score_seed`` afresh for every call, so save → load → score reproduces the
        maps exactly (for the same batch composition: the noise of a slice depends on its
        position in the batch).

        Args:
            images: float32 ``[B, C, H, W]`` on the model's device.
            brainmask: float32 ``[B, 1, H, W]`` (1 inside the brain).
        """
        if images.ndim != 4 or brainmask.ndim != 4 or brainmask.shape[1] != 1:
            raise ValueError(
                f"{self.name}: expected images [B, C, H, W] and brainmask [B, 1, H, W], got "
                f"{tuple(images.shape)} and {tuple(brainmask.shape)}"
            )
        generator = torch.Generator(device=images.device).manual_seed(self.score_seed)
        was_training = self.training
        self.eval()
        try:
            out = self._score(images, brainmask, generator)
        finally:
            self.train(was_training)
        b, _, h, w = images.shape
        if tuple(out.anomaly_map.shape) != (b, h, w):
            raise RuntimeError(
                f"{self.name}: anomaly map shape {tuple(out.anomaly_map.shape)}, "
                f"expected {(b, h, w)}"
            )
        return out

    @abc.abstractmethod
    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        """Method-specific scoring, called by :meth:`score` under ``no_grad`` in eval mode.

        Draw every random number from ``generator``.
        """

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write weights, name, hyperparameters and brainuad version to ``path`` atomically;
        identical weights give identical bytes (:func:`brainuad.io.torchfile.save_torch`)."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "name": self.name,
            "hparams": self.hparams,
            "brainuad_version": brainuad.__version__,
            "state_dict": state,
        }
        save_torch(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Method:
        """Rebuild a saved method (any registered one when called on ``Method``)."""
        from brainuad.methods.registry import build_method

        path = Path(path)
        payload = read_method_file(path, map_location)
        name = payload["name"]
        if cls is not Method and cls.name != name:
            raise InputError(f"{path}: holds method {name!r}, expected {cls.name!r}")
        method = build_method(name, **payload["hparams"])
        method.load_state_dict(payload["state_dict"])
        return method


def read_method_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of a file written by :meth:`Method.save`, checked for its format."""
    payload = load_torch(path, "brainuad model file", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a brainuad model file (format {CHECKPOINT_FORMAT})")
    return payload


def load_matching_state(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    what: str,
    skip_prefix: str | None = None,
) -> None:
    """Load ``state`` into ``module`` after checking that its keys and shapes are the module's
    (less the keys starting with ``skip_prefix``, which ``state`` leaves out): otherwise an
    InputError naming the file ``path``, before any weight is copied (torch reports other
    shapes with a RuntimeError that names no file)."""
    own = {
        k: v
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise InputError(
            f"{path}: weights do not match {what} (missing {missing}, unexpected "
            f"{unexpected}, other shapes {reshaped})"
        )
    module.load_state_dict(state, strict=skip_prefix is None)


def reconstruction_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    brainmask: torch.Tensor,
    *,
    loss: Literal["l1", "l2"],
    region: Literal["brain", "image"],
) -> torch.Tensor:
    """Mean L1 or squared error, over the whole image or over brain pixels only.

    Args:
        reconstruction, target: ``[B, C, H, W]``.
        brainmask: ``[B, 1, H, W]``, 1 inside the brain.
    """
    diff = reconstruction.float() - target.float()
    error = diff.abs() if loss == "l1" else diff.square()
    if region == "image":
        return error.mean()
    weight = brainmask.float().expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def residual_map(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """|x − x̂| averaged over channels: ``[B, C, H, W]`` × 2 → ``[B, H, W]``."""
    return (images.float() - reconstruction.float()).abs().mean(dim=1)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise InputError naming hyperparameter ``name`` if ``value`` is not in ``choices``."""
    if value not in choices:
        raise InputError(f"hyperparameter {name}={value!r}, expected one of {list(choices)}")


__all__ = [
    "FINAL_STAGE",
    "Method",
    "ScoreOutput",
    "Stage",
    "check_choice",
    "load_matching_state",
    "read_method_file",
    "reconstruction_loss",
    "residual_map",
]
