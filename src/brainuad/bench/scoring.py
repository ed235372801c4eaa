"""Scoring throughput of a configured method: one batch against a one-slice-at-a-time loop.

Run as ``python -m brainuad.bench.scoring --config config/paper.yaml --method autoddpm_t1
[--batch 8] [--set key=value ...] [--repeats 1] [--threads 1]``.
Builds ``methods.<method>`` of the config (random weights) at its inputs and working size,
and times ``Method.score`` on ``--batch`` random slices in [0, 1] with a disc brain mask:
once as one batch, once as a loop over the slices one at a time (the same maps, computed
slice by slice), each the minimum over ``--repeats`` runs after a one-slice warm-up.
``--set`` overrides model hyperparameters (YAML values), e.g. shorter chains so a CPU run
stays short; the table says which were used. Prints a Markdown row. A method whose
``score`` batches an ensemble inside each slice (cDDPM's noise levels) may also offer
``unbatched_score(images, brainmask)``, the same maps one slice and one network evaluation
at a time; it is then timed too (a second row, ``per evaluation``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from brainuad.data.datasets import method_inputs
from brainuad.methods import build_method
from brainuad.methods.base import Method


def disc_brainmask(batch: int, size: int) -> torch.Tensor:
    """``[batch, 1, size, size]`` mask of a centred disc covering most of the slice."""
    axis = torch.linspace(-1, 1, size)
    inside = (axis[:, None] ** 2 + axis[None, :] ** 2) <= 0.8**2
    return inside.float().expand(batch, 1, size, size).clone()


def scoring_seconds(
    method: Method, images: torch.Tensor, brainmask: torch.Tensor, repeats: int = 1
) -> tuple[float, float]:
    """(batched, looped) minimum seconds to score ``images`` ``[B, C, H, W]``."""
    method.score(images[:1], brainmask[:1])  # warm-up (allocations, lazy initialisation)

    def best(function) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    batched = best(lambda: method.score(images, brainmask))
    looped = best(
        lambda: [method.score(images[i : i + 1], brainmask[i : i + 1]) for i in range(len(images))]
    )
    return batched, looped


def unbatched_seconds(
    method: Method, images: torch.Tensor, brainmask: torch.Tensor, repeats: int = 1
) -> float | None:
    """Minimum seconds of the method's ``unbatched_score`` loop over the slices of
    ``images``, or None when it has none."""
    unbatched = getattr(method, "unbatched_score", None)
    if unbatched is None:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(images)):
            unbatched(images[i : i + 1], brainmask[i : i + 1])
        times.append(time.perf_counter() - start)
    return min(times)


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    spec = config["methods"][args.method]
    size = int(spec.get("size") or config["slices"]["size"])
    channels = len(method_inputs(config, args.method))
    overrides = parse_overrides(args.overrides)
    torch.manual_seed(0)
    method = build_method(
        spec.get("method", args.method),
        **{"in_channels": channels, **spec.get("model", {}), **overrides},
    )
    images = torch.rand(
        args.batch, channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    brainmask = disc_brainmask(args.batch, size)
    images = images * brainmask
    batched, looped = scoring_seconds(method, images, brainmask, args.repeats)
    print(f"{args.config}, {args.threads} thread(s), CPU; overrides: {overrides or 'none'}")
    print("| method | size | slices | batched slices/s | loop slices/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.method} | {size} | {args.batch} | {args.batch / batched:.3f} "
        f"| {args.batch / looped:.3f} | {looped / batched:.2f}x |"
    )
    per_evaluation = unbatched_seconds(method, images, brainmask, args.repeats)
    if per_evaluation is not None:
        print(
            f"| {args.method} (per evaluation) | {size} | {args.batch} "
            f"| {args.batch / batched:.3f} | {args.batch / per_evaluation:.3f} "
            f"| {per_evaluation / batched:.2f}x |"
        )


if __name__ == "__main__":
    main()
