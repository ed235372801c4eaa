"""Cost of ``wolleb``: a training step of each stage, and scoring batched against one slice
at a time (the reference scores with batch size 1).

Run as ``python -m brainuad.bench.wolleb [--config config/paper.yaml] [--method wolleb_t2]
[--batch 4] [--ddim-steps 2] [--threads 1]``. Builds ``methods.<method>`` of the config with
its hyperparameters at its size and inputs, on random slices in [0, 1] with mixed slice
labels; ``--ddim-steps`` overrides ``ddim_steps`` (scoring costs 2K UNet and K classifier-
gradient evaluations per slice, linear in K, so a few steps measure the per-step cost).
Prints a Markdown table of wall-clock and process CPU seconds (minimum over ``--repeats``
calls after one warm-up); with one thread on a shared machine the CPU seconds are the cost.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from brainuad.data.datasets import method_inputs
from brainuad.methods import build_method


def timed(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call of ``function``: minima over ``repeats``
    calls after one warm-up call."""
    function()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def measure(
    config: dict, name: str, *, batch: int, ddim_steps: int | None, repeats: int
) -> list[tuple[str, str]]:
    """Rows (what, value) of the measurements of ``methods.<name>``."""
    spec = config["methods"][name]
    size = int(spec.get("size") or config["slices"]["size"])
    channels = len(method_inputs(config, name))
    hparams = {"in_channels": channels, **spec.get("model", {})}
    if ddim_steps is not None:
        hparams["ddim_steps"] = ddim_steps
    torch.manual_seed(0)
    method = build_method(spec.get("method", name), **hparams)
    steps = method.hparams["ddim_steps"]
    images = torch.rand(batch, channels, size, size)
    mask = torch.ones(batch, 1, size, size)
    data = {"image": images, "brainmask": mask, "label": torch.arange(batch) % 2}
    rows = [
        ("size, channels, batch", f"{size}, {channels}, {batch}"),
        (
            "UNet / classifier parameters",
            f"{_millions(method.unet)} / {_millions(method.classifier)}",
        ),
    ]
    for stage in method.stages:
        optimizer = method.configure_optimizer(1e-4, stage.name)

        def step(stage=stage.name, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            method.stage_loss(stage, data).backward()
            optimizer.step()

        wall, cpu = timed(step, repeats)
        rows.append(
            (f"training step, stage `{stage.name}` (s wall / CPU)", f"{wall:.3f} / {cpu:.3f}")
        )

    batched, batched_cpu = timed(lambda: method.score(images, mask), repeats)

    def one_at_a_time() -> None:
        for i in range(batch):
            method.score(images[i : i + 1], mask[i : i + 1])

    looped, looped_cpu = timed(one_at_a_time, repeats)
    rows += [
        ("DDIM steps K (UNet evaluations per slice 2K)", f"{steps} ({2 * steps})"),
        (
            "scoring, whole batch at once (slices/s wall / CPU)",
            f"{batch / batched:.2f} / {batch / batched_cpu:.2f}",
        ),
        (
            "scoring, one slice at a time (slices/s wall / CPU)",
            f"{batch / looped:.2f} / {batch / looped_cpu:.2f}",
        ),
        (
            "speed-up of batching (wall / CPU)",
            f"{looped / batched:.2f}x / {looped_cpu / batched_cpu:.2f}x",
        ),
        ("scoring, CPU s per slice per DDIM step (batched)", f"{batched_cpu / batch / steps:.3f}"),
    ]
    return rows


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/paper.yaml"))
    parser.add_argument("--method", default="wolleb_t2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    rows = measure(
        config, args.method, batch=args.batch, ddim_steps=args.ddim_steps, repeats=args.repeats
    )
    print(f"{args.config} `{args.method}`, {args.threads} thread(s), CPU")
    print("| measure | value |")
    print("|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
