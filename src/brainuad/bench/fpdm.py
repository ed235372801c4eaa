"""AnoFPDM scoring against a direct transcription of the reference loop; DDIB scoring.

Run as ``python -m brainuad.bench.fpdm [--size 128] [--channels 4] [--batch 2] [--steps 5]
[--threads 1] [--device cpu]``. Builds ``anofpdm`` and ``ddib`` with their paper-sized
defaults (random weights: speed does not depend on them), and times on random slices:

- ``anofpdm``: :meth:`AnoFPDM.forward_process` (two evaluations per step in one call,
  streamed) against :func:`transcribed_forward_process` (the reference's
  ``calc_pred_xstart_loop``: four evaluations per step, every step kept), over ``--steps``
  forward-process steps (the paper's 600 scale linearly);
- ``ddib``: one translation with ``--steps`` encoding steps (3 evaluations per step);
- one training step of ``anofpdm`` (forward, backward, optimiser) at ``--train-batch``.

Prints a Markdown table of slices/s and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from brainuad.methods import build_method
from brainuad.methods.anofpdm import AnoFPDM
from brainuad.methods.base import FINAL_STAGE
from brainuad.methods.cfg_diffusion import HEALTHY, NULL, guided_epsilon, median_filter_2d


def _epsilon(method: AnoFPDM, sample: torch.Tensor, t: int, label: int) -> torch.Tensor:
    b = sample.shape[0]
    ts = torch.full((b,), t, device=sample.device, dtype=torch.long)
    labels = torch.full((b,), label, device=sample.device, dtype=torch.long)
    return method(sample, ts, labels).float()


@torch.no_grad()
def transcribed_forward_process(
    method: AnoFPDM, images: torch.Tensor, *, reference_indices: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AnoFPDM's scoring written as the reference loop: (map ``[B, H, W]``, max_diff
    ``[B, K]``, cosine ``[B]``).

    Per step four evaluations: ε(∅) for the inversion, ε(y = 0) and ε(∅) for the guided x̂0,
    ε(y = 0) again for the unguided x̂0; every step's x̂0 is kept (``[B, T, K, H, W]``) and
    the map computed at the end. ``reference_indices``: the inversion step at step k is
    taken from the previous sample with the current timestep (the reference's index),
    instead of from x_{t−s} with t − s; False gives the same numbers as the streamed loop.
    """
    method.eval()
    x = images.float() * 2 - 1
    channels = method.hparams["map_channels"] or list(range(x.shape[1]))
    w = method.hparams["guidance_scale"]
    s = method.stride
    guided, unguided = [], []
    sample = x
    for k in range(method.n_steps):
        t = k * s
        if k > 0:
            t_inv = t if reference_indices else t - s
            eps_inv = _epsilon(method, sample, t_inv, NULL)
            sample = _reversed_step(method, eps_inv, t_inv, t, sample)
        eps_c = _epsilon(method, sample, t, HEALTHY)
        eps_n = _epsilon(method, sample, t, NULL)
        guided.append(method.predict_x0(guided_epsilon(eps_c, eps_n, w), t, sample)[:, channels])
        eps_u = _epsilon(method, sample, t, HEALTHY)
        unguided.append(method.predict_x0(eps_u, t, sample)[:, channels])
    xg, xu = torch.stack(guided, 1), torch.stack(unguided, 1)  # [B, T, K, H, W]
    target = x[:, None, channels]
    diff = (xg - xu).square().mean(dim=(3, 4))  # [B, T, K]
    t_e = diff.argmax(dim=1)  # [B, K]
    sub = (xg - target).square()
    b, _, k, h, w_ = sub.shape
    maps = torch.empty(b, k, h, w_)
    for i in range(b):
        for c in range(k):
            end = max(int(t_e[i, c]), 1)  # the t_e = 0 guard of the streamed loop
            maps[i, c] = sub[i, :end, c].mean(dim=0)
    curve_g = sub.mean(dim=(2, 3, 4))
    curve_u = (xu - target).square().mean(dim=(2, 3, 4))
    cosine = torch.nn.functional.cosine_similarity(curve_g, curve_u, dim=1, eps=1e-6)
    anomaly_map = median_filter_2d(maps.mean(dim=1), method.hparams["median_kernel"])
    return anomaly_map, diff.amax(dim=1), cosine


def _reversed_step(
    method: AnoFPDM, eps: torch.Tensor, t_from: int, t_to: int, sample: torch.Tensor
) -> torch.Tensor:
    """DDIM inversion x_{t_from} → x_{t_to} with ε (x̂0 clipped, as ``reversed_step``)."""
    alphas = method.scheduler.alphas_cumprod.to(sample.device)
    a_from, a_to = alphas[t_from], alphas[min(t_to, len(alphas) - 1)]
    x0 = ((sample - (1 - a_from).sqrt() * eps) / a_from.sqrt()).clamp(-1, 1)
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=2, help="0: no training step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, steps = args.batch, args.steps
    print(
        f"{args.size} px, {args.channels} channels, batch {n}, {steps} steps, "
        f"{args.threads} thread(s), {device}",
        flush=True,
    )
    # map_channels: FLAIR and T2 of (t1, t1ce, t2, flair) as the reference's "--modality 0 3".
    map_channels = [0, args.channels - 1] if args.channels > 1 else None
    fpdm = build_method(
        "anofpdm", in_channels=args.channels, t_max=steps, map_channels=map_channels
    ).to(device)
    fpdm.eval()
    images = torch.rand(n, args.channels, args.size, args.size, device=device)
    print("| what | evaluations / slice | s | slices/s | s per slice × 600 / steps |")
    print("|---|---|---|---|---|", flush=True)

    def report(name: str, evals: int, seconds: float) -> None:
        per_slice_600 = seconds / n * 600 / steps
        print(
            f"| {name} | {evals} | {seconds:.2f} | {n / seconds:.3f} | {per_slice_600:.0f} |",
            flush=True,
        )

    with torch.no_grad():
        fpdm.null_and_healthy_epsilon(images, 0)  # warm-up: one call
        ours = _time(lambda: fpdm.forward_process(images), args.repeats)
        report("anofpdm, streamed (2 / step, one call)", 2 * steps, ours)
        transcribed = _time(lambda: transcribed_forward_process(fpdm, images), args.repeats)
        report("anofpdm, reference loop (4 / step, 3 at t = 0)", 4 * steps - 1, transcribed)
    print(f"\nanofpdm speed-up over the reference loop: {transcribed / ours:.2f}×\n", flush=True)
    ddib = build_method(
        "ddib", in_channels=args.channels, encode_timestep=steps, map_channels=map_channels
    ).to(device)
    ddib.eval()
    with torch.no_grad():
        report(
            "ddib (1 + 2 / step)", 3 * steps, _time(lambda: ddib.translate(images), args.repeats)
        )
    if args.train_batch:
        fpdm.train()
        optimizer = fpdm.configure_optimizer(1e-4, FINAL_STAGE)
        shape = (args.train_batch, args.channels, args.size, args.size)
        data = {
            "image": torch.rand(shape, device=device),
            "brainmask": torch.ones(args.train_batch, 1, args.size, args.size, device=device),
            "label": torch.arange(args.train_batch, device=device) % 2,
        }

        def train_step() -> None:
            optimizer.zero_grad()
            fpdm.stage_loss(FINAL_STAGE, data).backward()
            optimizer.step()

        train_s = _time(train_step, args.repeats)
        print(f"anofpdm training step, batch {args.train_batch}: {train_s:.2f} s", flush=True)


if __name__ == "__main__":
    main()
