"""Scoring throughput of a configured method: one batch against a one-slice-at-a-time loop.

Run as ``python -m brainuad.bench.scoring --config config/paper.yaml --method autoddpm_t1
[--batch 8] [--set key=value ...] [--repeats 1] [--threads 1] [--device cpu]``.
Builds ``methods.<method>`` of the config (random weights; zero-initialised layers such as
MONAI's UNet output get small random weights, so the maps are not constant) at its inputs
and working size, and times on ``--batch`` random slices in [0, 1] with a disc brain mask:

- **batched**: ``Method.score`` on all slices at once (what the workflow runs: ensembles,
  patches and resamplings of all slices as one network batch);
- **loop**: the same maps one slice at a time: ``Method.score`` on each slice, or, for a
  method whose reference also loops inside a slice, its per-slice reference from
  ``PER_SLICE_REFERENCES`` (pDDPM: one network pass per patch, as its reference code).

Each is the minimum over ``--repeats`` runs after a one-slice warm-up. The largest
difference between the two sets of maps is printed too: both draw from the scoring
generator seeded with ``score_seed``, so they agree wherever a slice's noise does not
depend on its batch (the references' simplex noise: one pattern per call).
``--set`` overrides model hyperparameters (YAML values), e.g. shorter chains so a CPU run
stays short (``reverse_steps=2`` for AnoDDPM); the table says which were used. Prints a
Markdown row.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from brainuad.data.datasets import method_inputs
from brainuad.methods import build_method
from brainuad.methods.base import Method
from brainuad.methods.pddpm import PatchedDDPM

#: A per-slice map function: images ``[1, C, H, W]``, brainmask ``[1, 1, H, W]`` →
#: anomaly map ``[1, H, W]``.
PerSlice = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def disc_brainmask(batch: int, size: int) -> torch.Tensor:
    """``[batch, 1, size, size]`` mask of a centred disc covering most of the slice."""
    axis = torch.linspace(-1, 1, size)
    inside = (axis[:, None] ** 2 + axis[None, :] ** 2) <= 0.8**2
    return inside.float().expand(batch, 1, size, size).clone()


@dataclass(frozen=True)
class ScoringTiming:
    """Seconds to score ``slices`` slices batched and one at a time, and the largest
    absolute difference between the two sets of maps."""

    slices: int
    batched_seconds: float
    loop_seconds: float
    max_abs_difference: float

    @property
    def speedup(self) -> float:
        return self.loop_seconds / self.batched_seconds


def compare_scoring(
    method: Method,
    images: torch.Tensor,
    brainmask: torch.Tensor,
    per_slice: PerSlice | None = None,
    *,
    repeats: int = 1,
) -> ScoringTiming:
    """Time ``method.score`` on the whole batch against ``per_slice`` called per slice.

    Args:
        method: the method (on the inputs' device).
        images: ``[B, C, H, W]``; brainmask: ``[B, 1, H, W]``.
        per_slice: the one-slice reference (default: ``method.score`` on one slice).
        repeats: timed repetitions of each (minimum reported), after a one-slice warm-up.
    """
    if per_slice is None:

        def per_slice(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return method.score(image, mask).anomaly_map

    def synchronise() -> None:
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)

    per_slice(images[:1], brainmask[:1])  # warm-up (allocations, numba, lazy initialisation)
    batched_times, loop_times = [], []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        batched = method.score(images, brainmask).anomaly_map
        synchronise()
        batched_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        looped = torch.cat(
            [per_slice(images[i : i + 1], brainmask[i : i + 1]) for i in range(len(images))]
        )
        synchronise()
        loop_times.append(time.perf_counter() - start)
    return ScoringTiming(
        slices=len(images),
        batched_seconds=min(batched_times),
        loop_seconds=min(loop_times),
        max_abs_difference=float((batched - looped).abs().max()),
    )


def scoring_seconds(
    method: Method, images: torch.Tensor, brainmask: torch.Tensor, repeats: int = 1
) -> tuple[float, float]:
    """(batched, looped) minimum seconds to score ``images`` ``[B, C, H, W]``, the loop
    calling ``Method.score`` per slice."""
    timing = compare_scoring(method, images, brainmask, repeats=repeats)
    return timing.batched_seconds, timing.loop_seconds


def pddpm_patch_by_patch(method: Method) -> PerSlice:
    """pDDPM as its reference scores: one network pass per patch of one slice, stitched."""
    if not isinstance(method, PatchedDDPM):
        raise TypeError(f"pddpm_patch_by_patch needs a PatchedDDPM, got {type(method)}")

    @torch.no_grad()
    def per_slice(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        method.eval()
        generator = torch.Generator(device=image.device).manual_seed(method.score_seed)
        x0 = image.float() * 2 - 1
        t = torch.full((1,), method.hparams["test_timestep"] - 1, device=image.device)
        noised = method.scheduler.add_noise(x0, method._draw_noise(x0, t, generator), t)
        stitched = torch.zeros_like(x0)
        for patch in method.patch_masks(x0):
            predicted = method(torch.where(patch, noised, x0), t)
            stitched = torch.where(patch, predicted.float(), stitched)
        return (image.float() - (stitched + 1) / 2).abs().mean(dim=1)

    return per_slice


#: Per-slice references of methods whose reference code loops inside a slice too, by
#: registered name; other methods are looped with ``Method.score`` on one slice.
PER_SLICE_REFERENCES: dict[str, Callable[[Method], PerSlice]] = {
    "pddpm": pddpm_patch_by_patch,
}


@torch.no_grad()
def randomise_zero_parameters(method: Method, std: float = 0.02) -> None:
    """Give all-zero parameters (zero-initialised output layers) N(0, std²) weights."""
    for parameter in method.parameters():
        if not parameter.any():
            parameter.normal_(0.0, std)


def parse_overrides(pairs: list[str]) -> dict:
    """``["key=value", …]`` → ``{key: YAML-parsed value}``."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/paper.yaml"))
    parser.add_argument("--method", required=True, help="a key of the config's methods")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = yaml.safe_load(args.config.read_text())
    spec = config["methods"][args.method]
    implementation = spec.get("method", args.method)
    size = int(spec.get("size") or config["slices"]["size"])
    channels = len(method_inputs(config, args.method))
    overrides = parse_overrides(args.overrides)
    torch.manual_seed(0)
    method = build_method(
        implementation, **{"in_channels": channels, **spec.get("model", {}), **overrides}
    )
    randomise_zero_parameters(method)
    method.to(device)
    images = torch.rand(
        args.batch, channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    brainmask = disc_brainmask(args.batch, size)
    images, brainmask = (images * brainmask).to(device), brainmask.to(device)
    reference = PER_SLICE_REFERENCES.get(implementation)
    timing = compare_scoring(
        method,
        images,
        brainmask,
        None if reference is None else reference(method),
        repeats=args.repeats,
    )
    loop = "Method.score per slice" if reference is None else reference.__name__
    print(
        f"{args.config}, {args.threads} thread(s), {device}; overrides: {overrides or 'none'}; "
        f"loop: {loop}"
    )
    print(
        "| method | size | slices | batched slices/s | loop slices/s | speed-up "
        "| max map difference |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.method} | {size} | {args.batch} "
        f"| {args.batch / timing.batched_seconds:.3f} | {args.batch / timing.loop_seconds:.3f} "
        f"| {timing.speedup:.2f}x | {timing.max_abs_difference:.1e} |"
    )


if __name__ == "__main__":
    main()
