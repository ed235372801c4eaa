"""Cost of one noise draw per kind and size, next to a training step.

Run as ``python -m brainuad.bench.noise [--sizes 96 128 256] [--batch 32] [--threads 1]``.
Prints a Markdown table: milliseconds per call (minimum and median over ``--repeats``
calls, after one warm-up call that also compiles numba's functions), and the time of one
training step (forward, backward, Adam) of the DDPM given by ``--step-channels`` at the
same size and batch, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from brainuad.methods import build_method
from brainuad.noise import build_noise


def time_calls(function, repeats: int) -> tuple[float, float]:
    """(minimum, median) seconds of ``repeats`` calls of ``function`` after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def training_step_seconds(channels: list[int], size: int, batch: int, repeats: int) -> float:
    """Minimum seconds of one DDPM training step (CPU) at ``size``² and ``batch``."""
    torch.manual_seed(0)
    method = build_method(
        "ddpm",
        channels=channels,
        attention_levels=[False] * len(channels),
        num_res_blocks=1,
        num_head_channels=channels[-1],
        norm_num_groups=8,
    )
    optimizer = method.configure_optimizer(1e-4)
    data = {
        "image": torch.rand(batch, 1, size, size),
        "brainmask": torch.ones(batch, 1, size, size),
    }

    def step() -> None:
        optimizer.zero_grad()
        method.training_loss(data).backward()
        optimizer.step()

    return time_calls(step, repeats)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    parser.add_argument("--step-channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--step-repeats", type=int, default=2, help="0: no training step")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"batch {args.batch}, 1 channel, {args.threads} thread(s), CPU\n")
    print("| noise | " + " | ".join(f"{s} × {s}" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for kind in ("gaussian", "simplex", "simplex_3d"):
        noise = build_noise(kind)
        cells = []
        for size in args.sizes:
            shape = (args.batch, 1, size, size)
            timesteps = torch.randint(0, 1000, (args.batch,))
            low, median = time_calls(lambda n=noise, s=shape, t=timesteps: n(s, t), args.repeats)
            cells.append(f"{low * 1e3:.1f} ms ({median * 1e3:.1f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if args.step_repeats > 0:
        cells = [
            f"{training_step_seconds(args.step_channels, s, args.batch, args.step_repeats):.2f} s"
            for s in args.sizes
        ]
        label = f"DDPM step, UNet {tuple(args.step_channels)}, 1 res block"
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
