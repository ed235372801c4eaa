"""One training step per configured method, at the sizes of a study config.

Run as ``python -m brainuad.bench.steps [--config config/paper.yaml] [--method NAME ...]
[--batch N] [--threads 1]``.
Builds every trained method of the config (or those named with ``--method``) with its
``model`` hyperparameters, its inputs and working size (``inputs``, ``size``, default the
config's slice size), and times one training step of each of its stages (forward,
backward, optimiser; a row per stage for methods of several stages) on random slices in
[0, 1] with alternating slice labels: the minimum over ``--repeats`` steps after one warm-up
step. The batch is the
method's configured ``training.batch_size`` unless ``--batch`` overrides it (paper-sized
batches take minutes per step on a CPU). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from brainuad.bench.noise import time_calls
from brainuad.data.datasets import method_inputs
from brainuad.methods import build_method, method_class
from brainuad.methods.base import FINAL_STAGE


def step_seconds(
    config: dict, name: str, batch: int | None, repeats: int, stage: str = FINAL_STAGE
) -> tuple[int, float]:
    """(batch, minimum seconds) of one training step of ``stage`` of ``methods.<name>``."""
    spec = config["methods"][name]
    size = int(spec.get("size") or config["slices"]["size"])
    channels = len(method_inputs(config, name))
    batch = batch or int(spec.get("training", {}).get("batch_size", 16))
    torch.manual_seed(0)
    method = build_method(
        spec.get("method", name), **{"in_channels": channels, **spec.get("model", {})}
    )
    optimizer = method.configure_optimizer(1e-4, stage)
    data = {
        "image": torch.rand(batch, channels, size, size),
        "brainmask": torch.ones(batch, 1, size, size),
        "label": torch.arange(batch) % 2,
    }

    def step() -> None:
        optimizer.zero_grad()
        method.stage_loss(stage, data).backward()
        optimizer.step()

    return batch, time_calls(step, repeats)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/paper.yaml"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--method", "--methods", nargs="*", default=None, help="keys of the config's methods"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    print(f"{args.config}, {args.threads} thread(s), CPU")
    print("| method | implementation | size | batch | parameters | s per step |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for name, spec in config["methods"].items():
        if args.method and name not in args.method:
            continue
        implementation = spec.get("method", name)
        # Variants that differ only in the sequence read (t1/t2) cost the same.
        identity = yaml.safe_dump([implementation, spec.get("model"), spec.get("size")])
        if not method_class(implementation).stages or identity in seen:
            continue
        seen.add(identity)
        size = int(spec.get("size") or config["slices"]["size"])
        method = build_method(implementation, **spec.get("model", {}))
        stages = method_class(implementation).stages
        for stage in stages:
            batch, seconds = step_seconds(config, name, args.batch, args.repeats, stage.name)
            trained = method.stage_parameters(stage.name)
            parameters = sum(p.numel() for p in trained)
            label = name if len(stages) == 1 else f"{name} (stage `{stage.name}`)"
            print(
                f"| {label} | {implementation} | {size} | {batch} | {parameters / 1e6:.1f} M "
                f"| {seconds:.2f} |"
            )


if __name__ == "__main__":
    main()
