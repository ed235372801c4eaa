"""The contract every anomaly-detection method fulfils.

A method is a ``torch.nn.Module`` with keyword-only hyperparameters, a training loss on a
batch of healthy slices, and a deterministic scoring function that turns slices into
pixel-wise anomaly maps. Training itself is not the method's business: ``fit`` hands the
method to the one shared loop in :mod:`brainuad.training.loop`.

Shapes: ``B`` batch, ``C`` sequences (channels), ``H`` × ``W`` slice size. Images are
normalised to [0, 1] with 0 outside the brain.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

import brainuad
from brainuad.errors import InputError
from brainuad.io.torchfile import load_torch, save_torch

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from brainuad.training.loop import TrainingRun

CHECKPOINT_FORMAT = "brainuad.method/1"


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
    with the weights), and implement :meth:`training_loss` and :meth:`_score`.

    Class attributes:
        name: the registry name (set by ``register``).
        supervision: ``"healthy"`` (trained on healthy slices only) or ``"image_labels"``
            (also uses slice-level labels).
        has_reconstruction: whether ``score`` returns a reconstruction.
        default_learning_rate, default_batch_size: the paper's values, used when the
            ``TrainingRun`` leaves them unset.
        scoring_hparams: hyperparameters that only affect scoring, not the weights (e.g. a
            noise level or seed used at test time). The training loop leaves them out when
            it checks that a checkpoint belongs to the run, so changing one re-scores
            without retraining; the saved model carries the current values.
    """

    name: ClassVar[str] = ""
    supervision: ClassVar[Literal["healthy", "image_labels"]] = "healthy"
    has_reconstruction: ClassVar[bool] = True
    default_learning_rate: ClassVar[float] = 1e-4
    default_batch_size: ClassVar[int] = 32
    scoring_hparams: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(hparams)

    # -- training --------------------------------------------------------------------------

    @abc.abstractmethod
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss on a collated batch of slices.

        Args:
            batch: at least ``image`` float32 ``[B, C, H, W]`` and ``brainmask`` float32
                ``[B, 1, H, W]``, on the model's device (also ``label`` ``[B]``, ``row``).
        """

    def configure_optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        """The optimiser, from the ``optimizer`` and ``weight_decay`` hyperparameters."""
        kind = self.hparams.get("optimizer", "adam")
        weight_decay = float(self.hparams.get("weight_decay", 0.0))
        if kind == "adam":
            return torch.optim.Adam(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        if kind == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        raise InputError(f"method {self.name!r}: optimizer {kind!r}, expected 'adam' or 'adamw'")

    def fit(
        self,
        train: Dataset,
        val: Dataset | None,
        run: TrainingRun,
        *,
        data_fingerprint: str | None = None,
    ) -> dict[str, Any]:
        """Train with the shared loop (checkpoints, resume, logging); returns its summary."""
        from brainuad.training.loop import train as train_loop

        return train_loop(self, train, val, run, data_fingerprint=data_fingerprint)

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
        payload = load_torch(path, "brainuad model file", map_location=map_location)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path}: not a brainuad model file (format {CHECKPOINT_FORMAT})")
        name = payload["name"]
        if cls is not Method and cls.name != name:
            raise InputError(f"{path}: holds method {name!r}, expected {cls.name!r}")
        method = build_method(name, **payload["hparams"])
        method.load_state_dict(payload["state_dict"])
        return method


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


__all__ = ["Method", "ScoreOutput", "check_choice", "reconstruction_loss", "residual_map"]
