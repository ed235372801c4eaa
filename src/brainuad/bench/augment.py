"""Cost of the intensity augmentation on one training batch.

Run as ``python -m brainuad.bench.augment [--sizes 96 128 256] [--batch 32]``. Prints a
Markdown table: minimum milliseconds over ``--repeats`` calls (after a warm-up call) with the
reference's probabilities and with all four transforms forced on (p = 1).
"""

from __future__ import annotations

import argparse

import torch

from brainuad.augment import build_intensity_augmentation
from brainuad.bench.noise import time_calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {
        "reference probabilities": {},
        "all four transforms (p = 1)": {
            "gamma_p": 1.0,
            "bias_field_p": 1.0,
            "blur_p": 1.0,
            "ghosting_p": 1.0,
        },
    }
    print(f"batch {args.batch}, 1 channel, {args.threads} thread(s), CPU\n")
    print("| augmentation | " + " | ".join(f"{s} × {s}" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for label, settings in variants.items():
        augmentation = build_intensity_augmentation(settings)
        cells = []
        for size in args.sizes:
            images = torch.rand(args.batch, 1, size, size)
            mask = torch.ones(args.batch, 1, size, size)
            low, median = time_calls(lambda a=augmentation, x=images, m=mask: a(x, m), args.repeats)
            cells.append(f"{low * 1e3:.1f} ms ({median * 1e3:.1f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
