"""AnoFPDM: anomaly detection along the forward process of a classifier-free guided DDPM.

Che, Rafsani, Shah, Wu, "AnoFPDM: Anomaly Segmentation with Forward Process of Diffusion
Models for Brain MRI", arXiv 2404.15683 (Sec. 3); reference SoloChe/AnoFPDM (facts checked,
no code copied): ``scripts/translation_FPDM.py``, ``scripts/obtain_hyperpara.py``,
``guided_diffusion/gaussian_diffusion.py`` (``calc_pred_xstart_loop``),
``config/run_translation_brats_fpdm.sh`` (w = 2, forward_steps 600, modality 0 3 = FLAIR, T2,
EMA weights), ``config/run_train_brats_clf_free_guided.sh`` (model, label drop 0.1).

Model and training: :class:`~brainuad.methods.cfg_diffusion.ClassifierFreeDiffusion` (one
classifier-free guided ε-UNet on healthy and lesion slices with their slice labels).

Scoring, for x ∈ [−1, 1] ``[B, C, H, W]``: walk the deterministic DDIM forward process with
the null label, x_0 = x, x_{t+s} = DDIM-inversion(x_t, ε(x_t, t, ∅)), for the grid timesteps
t = 0, s, 2s, … < ``t_max`` (s = 1 and t_max = 600 in the paper: 600 steps). At each t, ONE
network call on a ``[2B]`` batch gives ε(x_t, t, ∅) and ε(x_t, t, y = 0); ε(∅) serves both
the guidance and the inversion step, ε(y = 0) both x̂0 estimates:

- x̂0^g from ε̃ = (1 + w) ε(y = 0) − w ε(∅) (guided toward healthy, w = 2),
- x̂0^u from ε(y = 0) (the "unguided" healthy conditional, w = 0),

so a step costs two evaluations where the reference's loop costs four. On the map channels
(FLAIR and T2 in the reference; ``map_channels``, default all inputs):

- D_t = mean_hw (x̂0^g − x̂0^u)² per channel; t_e = argmax_t D_t per slice and channel;
- map_c = mean over steps t < t_e of (x̂0^g − x)²_c; the map is the mean over channels,
  median-filtered 5 × 5;
- per slice, for the label-free selection: max_t D_t per channel, and the cosine similarity
  over t of the curves mean_chw (x̂0^g − x)² and mean_chw (x̂0^u − x)².

The aggregation is a stream (:class:`ForwardProcessAggregator`): a running prefix sum of
(x̂0^g − x)² and, per slice and channel, a snapshot of it taken whenever D_t reaches a new
maximum, so the memory does not grow with ``t_max`` (the reference keeps every step).

Label-free constants (:func:`select_constants`, :func:`selection_from_slices`,
:func:`select_for_fold`): ``thr_cos``, the quantile of the healthy validation slices' cosine
similarities in linspace(0.005, 0.095, 100) that misclassifies the fewest validation slices,
and ``diff_max``, the largest max_t D_t over lesion validation slices, per channel
(``obtain_hyperpara.py``, ``cal_cos_and_abe_range``); from validation images and slice labels
only. :func:`slice_thresholds` applies them: a slice's pixel threshold is the q-quantile of its
per-channel maps (mean over channels), q ∈ linspace(0.98, 0.90, 101) indexed by
round(clamp(max_t D_t / diff_max, 0, 1), 2) · 100, and the slice is called a lesion slice when
its cosine similarity ≤ ``thr_cos`` (``get_mask_batch_FPDM``).

``score`` returns the continuous map, so the study's shared calibration and metrics apply to
AnoFPDM as to every method. The workflow's ``select_anofpdm_constants`` rule writes each
fold's ``selection.json`` (:func:`select_for_fold`); the per-slice thresholds and decisions
(:func:`slice_thresholds`) are not yet used by any table.

Deviations from the reference:
- The inversion and the x̂0 estimates use the same (x_t, t): the reference evaluates the
  inversion at the previous step's sample with the current t (an index one off from the
  guided evaluation's) and starts from x_1 = q_sample(x, 0) with fresh Gaussian noise; here
  x_0 = x (deterministic), and ε(x_t, t, ∅) drives x_t → x_{t+s} as in DDIM inversion.
- t_e = 0 (the maximum at the first step): the reference averages an empty range (division by
  zero); here the map is the first step's (x̂0^g − x)².
- MONAI ``DiffusionModelUNet``: the label embedding is added to the time embedding only (the
  reference's v2 UNet also feeds it to the attention keys/values); additive time embedding
  instead of scale-shift norm; no learned variance (the reference has none either).
- EMA as the reference: the EMA weights (decay 0.9999, ``ema_decay``) score, as its
  translation scripts load the EMA checkpoint (``--ema True``); the CPU configs lower the
  decay to suit their few hundred training steps.
- Images are the study's [0, 1] slices mapped to [−1, 1] (0 outside the brain → −1); the
  reference min–max normalises each slice to [−1, 1].
- MONAI's ``reversed_step`` keeps the network's ε after clipping x̂0 to [−1, 1]; the
  reference re-derives ε from the clipped x̂0.
- Components ≤ 40 px are not dropped here: the study's post-processing (3D components,
  ``evaluation.postprocess``) applies to every method alike.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path
from brainuad.io.hdf5 import read_rows
from brainuad.methods.base import ScoreOutput
from brainuad.methods.cfg_diffusion import (
    ClassifierFreeDiffusion,
    check_map_settings,
    guided_epsilon,
    median_filter_2d,
)
from brainuad.methods.registry import register
from brainuad.provenance import provenance

#: The reference's range of per-slice quantiles (``torch.linspace(0.90, 0.98, 101)``, flipped:
#: a larger guided/unguided difference gives a lower quantile, i.e. more flagged pixels).
QUANTILE_RANGE = (0.90, 0.98, 101)
#: The quantiles of healthy cosine similarities searched for ``thr_cos``.
COSINE_QUANTILES = (0.005, 0.095, 100)


class ForwardProcessAggregator:
    """Streaming AnoFPDM statistics over the forward process, memory flat in the step count.

    Feed :meth:`update` once per step with x̂0^g and x̂0^u ``[B, K, H, W]`` on the K map
    channels; :meth:`result` gives the maps without having kept any step.

    State: prefix sum and its snapshot at the current argmax ``[B, K, H, W]`` each, the first
    step's term (the t_e = 0 guard), and ``[B, K]`` / ``[B]`` scalars.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        b, k = x.shape[:2]
        self.prefix = torch.zeros_like(x)
        self.snapshot = torch.zeros_like(x)
        self.first_term: torch.Tensor | None = None
        self.best_diff = torch.full((b, k), -math.inf, device=x.device)
        self.best_step = torch.zeros((b, k), dtype=torch.long, device=x.device)
        self.dot = torch.zeros(b, device=x.device, dtype=torch.float64)
        self.norm_guided = torch.zeros_like(self.dot)
        self.norm_unguided = torch.zeros_like(self.dot)
        self.steps = 0

    def update(self, x0_guided: torch.Tensor, x0_unguided: torch.Tensor) -> None:
        """Add one step's guided and unguided x̂0 ``[B, K, H, W]``."""
        diff = (x0_guided - x0_unguided).square().mean(dim=(2, 3))  # [B, K]
        term = (x0_guided - self.x).square()
        if self.first_term is None:
            self.first_term = term.clone()
        # Strictly greater: the first maximum wins, as torch.argmax.
        better = diff > self.best_diff
        self.snapshot = torch.where(better[..., None, None], self.prefix, self.snapshot)
        self.best_step = torch.where(
            better, torch.full_like(self.best_step, self.steps), self.best_step
        )
        self.best_diff = torch.where(better, diff, self.best_diff)
        self.prefix += term
        mse_guided = term.mean(dim=(1, 2, 3)).double()
        mse_unguided = (x0_unguided - self.x).square().mean(dim=(1, 2, 3)).double()
        self.dot += mse_guided * mse_unguided
        self.norm_guided += mse_guided.square()
        self.norm_unguided += mse_unguided.square()
        self.steps += 1

    def channel_maps(self) -> torch.Tensor:
        """Per-channel maps ``[B, K, H, W]``: mean over steps t < t_e of (x̂0^g − x)²."""
        if self.first_term is None:
            raise RuntimeError("ForwardProcessAggregator: no step was added")
        count = self.best_step[..., None, None].float()
        return torch.where(count > 0, self.snapshot / count.clamp_min(1.0), self.first_term)

    def cosine(self) -> torch.Tensor:
        """Cosine similarity over t of the guided and unguided MSE curves, ``[B]``."""
        eps = 1e-6
        denominator = self.norm_guided.sqrt().clamp_min(eps) * self.norm_unguided.sqrt().clamp_min(
            eps
        )
        return (self.dot / denominator).float()


@dataclass(frozen=True)
class ForwardProcessStatistics:
    """AnoFPDM's per-slice results.

    Attributes:
        anomaly_map: ``[B, H, W]`` mean over map channels, median-filtered.
        channel_maps: ``[B, K, H, W]`` per-channel maps before filtering.
        max_diff: ``[B, K]`` max_t mean_hw (x̂0^g − x̂0^u)².
        end_step: ``[B, K]`` t_e as a step index (timestep t_e · stride).
        cosine: ``[B]`` cosine similarity of the guided and unguided MSE curves.
    """

    anomaly_map: torch.Tensor
    channel_maps: torch.Tensor
    max_diff: torch.Tensor
    end_step: torch.Tensor
    cosine: torch.Tensor


@register("anofpdm")
class AnoFPDM(ClassifierFreeDiffusion):
    """Classifier-free guided DDPM scored along its deterministic forward process.

    Args:
        guidance_scale: w of ε̃ = (1 + w) ε(y = 0) − w ε(∅): 2 on BraTS (``--w 2`` in
            ``config/run_translation_brats_fpdm.sh``; 20 on ATLAS).
        t_max: the forward process visits the grid timesteps t < t_max (600,
            ``forward_steps=600``).
        map_channels: indices of the input channels the map is computed on (the reference:
            FLAIR and T2, ``--modality 0 3``); default all.
        median_kernel: side of the median filter of the map (5, ``median_pool``); 1: none.
        Shared hyperparameters: see :class:`ClassifierFreeDiffusion` (``num_inference_steps``
        sets the grid stride; the paper walks every timestep).

        ``guidance_scale``, ``t_max``, ``map_channels``, ``median_kernel``,
        ``num_inference_steps`` and ``score_seed`` only affect scoring.

    Input ``[B, C, H, W]`` in [0, 1], H and W divisible by 2^(len(channels) − 1).
    """

    has_reconstruction = False
    scoring_hparams = frozenset(
        {
            "guidance_scale",
            "t_max",
            "map_channels",
            "median_kernel",
            "num_inference_steps",
            "score_seed",
        }
    )

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 128, 256, 384, 512),
        attention_levels: Sequence[bool] = (False, False, True, True, True),
        num_res_blocks: int = 2,
        num_head_channels: int | Sequence[int] = (32, 32, 64, 96, 128),
        norm_num_groups: int = 32,
        resblock_updown: bool = True,
        dropout: float = 0.1,
        label_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        num_inference_steps: int = 1000,
        guidance_scale: float = 2.0,
        t_max: int = 600,
        map_channels: Sequence[int] | None = None,
        median_kernel: int = 5,
        score_seed: int = 0,
        optimizer: Literal["adam", "adamw"] = "adamw",
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.9999,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            dropout=dropout,
            label_dropout=label_dropout,
            num_train_timesteps=num_train_timesteps,
            num_inference_steps=num_inference_steps,
            score_seed=score_seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            guidance_scale=float(guidance_scale),
            t_max=int(t_max),
            map_channels=None if map_channels is None else [int(c) for c in map_channels],
            median_kernel=int(median_kernel),
        )
        if not 1 <= t_max <= num_train_timesteps:
            raise InputError(
                f"hyperparameter t_max={t_max}, expected 1 … num_train_timesteps "
                f"({num_train_timesteps})"
            )
        check_map_settings(map_channels, median_kernel, in_channels)

    @property
    def n_steps(self) -> int:
        """Steps of the forward process: the grid timesteps below ``t_max``."""
        return math.ceil(self.hparams["t_max"] / self.stride)

    def forward_process(self, images: torch.Tensor) -> ForwardProcessStatistics:
        """Run the forward process on ``[B, C, H, W]`` slices in [0, 1] (no gradients)."""
        x = images.float() * 2 - 1
        channels = self.hparams["map_channels"] or list(range(x.shape[1]))
        w = self.hparams["guidance_scale"]
        aggregator = ForwardProcessAggregator(x[:, channels])
        sample = x
        for k in range(self.n_steps):
            t = k * self.stride
            eps_null, eps_healthy = self.null_and_healthy_epsilon(sample, t)
            x0_guided = self.predict_x0(guided_epsilon(eps_healthy, eps_null, w), t, sample)
            x0_unguided = self.predict_x0(eps_healthy, t, sample)
            aggregator.update(x0_guided[:, channels], x0_unguided[:, channels])
            if k + 1 < self.n_steps:
                sample, _ = self.scheduler.reversed_step(eps_null, t, sample)
        channel_maps = aggregator.channel_maps()
        anomaly_map = median_filter_2d(channel_maps.mean(dim=1), self.hparams["median_kernel"])
        return ForwardProcessStatistics(
            anomaly_map=anomaly_map,
            channel_maps=channel_maps,
            max_diff=aggregator.best_diff,
            end_step=aggregator.best_step,
            cosine=aggregator.cosine(),
        )

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        return ScoreOutput(self.forward_process(images).anomaly_map)


# -- label-free selection of the per-slice threshold constants ------------------------------


def select_constants(
    cosine: torch.Tensor, max_diff: torch.Tensor, image_labels: torch.Tensor
) -> dict[str, Any]:
    """``thr_cos`` and ``diff_max`` from validation slices and their slice labels only.

    Args:
        cosine: ``[N]`` per-slice cosine similarities (:class:`ForwardProcessStatistics`).
        max_diff: ``[N, K]`` per-slice max_t D_t per map channel.
        image_labels: ``[N]`` slice labels (1: lesion slice).

    Returns:
        ``{"thr_cos", "cos_quantile", "n_misclassified", "diff_max" (list of K),
        "diff_min" (list of K)}``; a slice is called a lesion slice when its cosine ≤ thr_cos.

    Raises:
        InputError: without at least one healthy and one lesion slice.
    """
    labels = torch.as_tensor(image_labels).long().flatten()
    cosine = cosine.double().flatten()
    healthy, lesion = cosine[labels == 0], cosine[labels == 1]
    if healthy.numel() == 0 or lesion.numel() == 0:
        raise InputError(
            f"AnoFPDM selection needs healthy and lesion validation slices; got "
            f"{healthy.numel()} healthy and {lesion.numel()} lesion slice(s)"
        )
    best: tuple[int, float, float] | None = None
    for q in np.linspace(*COSINE_QUANTILES):
        threshold = float(torch.quantile(healthy, float(q)))
        errors = int((lesion > threshold).sum() + (healthy < threshold).sum())
        if best is None or errors < best[0]:
            best = (errors, threshold, float(q))
    assert best is not None
    lesion_max = max_diff.double()[labels == 1]
    return {
        "thr_cos": best[1],
        "cos_quantile": best[2],
        "n_misclassified": best[0],
        "diff_max": lesion_max.max(dim=0).values.tolist(),
        "diff_min": lesion_max.min(dim=0).values.tolist(),
    }


def slice_thresholds(
    stats: ForwardProcessStatistics, constants: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice pixel thresholds ``[B]`` and lesion-slice decisions ``[B]`` (bool).

    The threshold is the mean over channels of each channel map's q-quantile, q picked by
    max_t D_t / diff_max; the decision is cosine ≤ thr_cos (``get_mask_batch_FPDM``).
    """
    diff_max = torch.as_tensor(constants["diff_max"], dtype=torch.float32)
    ratio = (stats.max_diff.float().cpu() / diff_max).clamp(0, 1)
    index = (torch.round(ratio, decimals=2) * 100).long()
    quantiles = torch.linspace(*QUANTILE_RANGE).flip(0)[index]  # [B, K]
    flat = stats.channel_maps.float().cpu().flatten(2)  # [B, K, HW]
    per_channel = torch.stack(
        [
            torch.stack([torch.quantile(flat[b, k], quantiles[b, k]) for k in range(flat.shape[1])])
            for b in range(flat.shape[0])
        ]
    )
    is_lesion = stats.cosine.cpu() <= float(constants["thr_cos"])
    return per_channel.mean(dim=1), is_lesion


def selection_from_slices(
    method: AnoFPDM,
    sources: Sequence[tuple[str | os.PathLike, Sequence[str]]],
    *,
    sequences: Sequence[str] | None = None,
    size: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Select AnoFPDM's constants on validation slices: ``sources`` are (slice file, subjects
    of its validation split) pairs, pooled.

    Reads only the ``images`` of each slice file and its slice ``label`` column (never
    ``seg``, the pixel labels), scores them with ``method`` (the channels ``sequences``,
    resampled to the method's working ``size``) and returns the entry
    :func:`write_selection` records.
    """
    from brainuad.slices.hdf5 import SliceFile
    from brainuad.slices.resize import resize_image

    device = next(method.parameters()).device
    was_training = method.training
    method.eval()
    cosine, max_diff, labels, read_from = [], [], [], []
    try:
        for slice_file, subjects in sources:
            slices = SliceFile(slice_file)
            rows = slices.rows_for_subjects(subjects)
            channels = slices.channel_indices(sequences)
            for start in range(0, len(rows), batch_size):
                batch_rows = rows[start : start + batch_size]
                images = torch.from_numpy(read_rows(slices.file["images"], batch_rows))
                images = images[:, channels]
                if size is not None:
                    images = resize_image(images, size)
                with torch.no_grad():
                    stats = method.forward_process(images.to(device))
                cosine.append(stats.cosine.cpu())
                max_diff.append(stats.max_diff.cpu())
            slices.close()
            labels.append(torch.from_numpy(slices.labels[rows].astype(np.int64)))
            read_from.append(
                {"slice_file": str(slice_file), "subjects": sorted(subjects), "slices": len(rows)}
            )
    finally:
        method.train(was_training)
    all_labels = torch.cat(labels)
    constants = select_constants(torch.cat(cosine), torch.cat(max_diff), all_labels)
    return {
        "constants": constants,
        "hparams": {
            key: method.hparams[key]
            for key in ("guidance_scale", "t_max", "num_inference_steps", "map_channels")
        },
        "chosen_on": {
            "split": "val",
            "sources": read_from,
            "n_slices": len(all_labels),
            "n_lesion_slices": int(all_labels.sum()),
            "read": ["images", "label"],
            "uses_pixel_labels": False,
            "uses_test_data": False,
        },
    }


def write_selection(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Write ``selection.json``: the constants, what they were chosen on, and provenance."""
    record = {**entry, "provenance": provenance()}
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def select_for_fold(
    *,
    model_path: str | os.PathLike,
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    fold: int,
    out_path: str | os.PathLike,
    inputs: Sequence[str] | None = None,
    size: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, Any]:
    """The workflow's entry point: load a trained ``anofpdm`` model, select its constants on
    the ``val`` subjects of fold ``fold`` of each (slice file, splits file) in ``sources``,
    and write ``selection.json`` to ``out_path``."""
    from brainuad.methods.base import Method
    from brainuad.slices.splits import subjects_in
    from brainuad.training.device import resolve_device

    method = Method.load(model_path)
    if not isinstance(method, AnoFPDM):
        raise InputError(f"{model_path}: method {method.name!r}, expected an anofpdm model")
    method.to(resolve_device(device))
    pairs = [(slices, subjects_in(splits, fold=fold, split="val")) for slices, splits in sources]
    entry = selection_from_slices(method, pairs, sequences=inputs, size=size, batch_size=batch_size)
    entry["model"] = str(model_path)
    write_selection(out_path, entry)
    return entry


__all__ = [
    "AnoFPDM",
    "ForwardProcessAggregator",
    "ForwardProcessStatistics",
    "select_constants",
    "select_for_fold",
    "selection_from_slices",
    "slice_thresholds",
    "write_selection",
]
