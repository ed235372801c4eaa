"""What makes AnoFPDM and DDIB themselves: classifier-free guidance, exactly paired DDIM,
AnoFPDM's streamed aggregation (equal to the full-memory computation, memory flat in T_max),
two network evaluations per step, and a label-free selection of its constants."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from tiny_hparams import CFG_TINY

from brainuad.bench.fpdm import transcribed_forward_process
from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.anofpdm import (
    ForwardProcessAggregator,
    ForwardProcessStatistics,
    select_constants,
    selection_from_slices,
    slice_thresholds,
    write_selection,
)
from brainuad.methods.cfg_diffusion import HEALTHY, NULL, guided_epsilon, median_filter_2d
from brainuad.slices.hdf5 import SliceWriter


def randomised(method):
    """MONAI zero-initialises the UNet's output convolutions (ε ≡ 0): give every weight
    small random values so the tests see a non-trivial ε; the null row stays zero."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if "class_embedding" in name:
                p[:NULL].normal_()
            else:
                p.add_(0.05 * torch.randn_like(p))
    return method.eval()


def fpdm(**kwargs):
    return randomised(build_method("anofpdm", in_channels=2, **{**CFG_TINY, **kwargs}))


def test_guided_epsilon_formula_and_w0_is_the_conditional():
    cond, null = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(guided_epsilon(cond, null, 0.0), cond)
    torch.testing.assert_close(guided_epsilon(cond, null, 2.0), 3 * cond - 2 * null)


def test_batched_pair_equals_separate_conditional_and_null_calls():
    method = fpdm()
    x, t = torch.randn(3, 2, 32, 32), 300
    with torch.no_grad():
        eps_null, eps_healthy = method.null_and_healthy_epsilon(x, t)
        ts = torch.full((3,), t)
        healthy = method(x, ts, torch.full((3,), HEALTHY))
        null = method(x, ts, torch.full((3,), NULL))
    torch.testing.assert_close(eps_healthy, healthy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_null, null, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(healthy, null, atol=1e-3)  # the label matters
    # w = 0: the guided x̂0 is the healthy conditional's, so D_t = 0 at every step.
    stats = randomised(build_method("anofpdm", in_channels=2, **CFG_TINY, guidance_scale=0.0))
    with torch.no_grad():
        out = stats.forward_process(torch.rand(2, 2, 32, 32))
    assert torch.equal(out.max_diff, torch.zeros_like(out.max_diff))


def test_null_embedding_is_zero_and_stays_untrained():
    method = build_method("anofpdm", in_channels=1, **CFG_TINY)
    table = method.unet.class_embedding.weight
    assert torch.equal(table[NULL], torch.zeros_like(table[NULL]))
    optimizer = method.configure_optimizer(1e-2)
    batch = {
        "image": torch.rand(8, 1, 32, 32),
        "brainmask": torch.ones(8, 1, 32, 32),
        "label": torch.tensor([0, 1] * 4),
    }
    before = table.detach().clone()
    torch.manual_seed(3)  # label dropout 0.1 of 8 slices: this seed drops at least one
    for _ in range(3):
        optimizer.zero_grad()
        method.training_loss(batch).backward()
        optimizer.step()
    assert torch.equal(table[NULL], torch.zeros_like(table[NULL]))
    assert not torch.equal(table[:NULL], before[:NULL])


def test_ddim_encode_decode_without_guidance_reconstructs():
    # With the healthy embedding set to ∅'s, decoding at w = 0 uses the encoder's ε, so the
    # exactly paired grid inverts the encoding up to the DDIM approximation ε(x_t, t) ≈
    # ε(x_{t+s}, t + s). That needs an ε smooth in x_t, as a trained one; a random UNet's
    # (std 0.2, rough) makes the inversion diverge, so its output layer is scaled down.
    # Seeded before the build: the initial weights must not depend on earlier tests' draws.
    torch.manual_seed(0)
    method = build_method("ddib", in_channels=1, **{**CFG_TINY, "num_inference_steps": 50})
    randomised(method)
    with torch.no_grad():
        method.unet.class_embedding.weight[HEALTHY] = 0.0
        method.unet.out[-1].conv.weight.mul_(0.1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = (0.8 * torch.cos(2 * xx) * torch.sin(3 * yy))[None, None]
    with torch.no_grad():
        latent = method.ddim_encode(x, 15)  # stride 20, to t = 300
        decoded = method.ddim_decode(latent, 15, w=0.0)
        # Off-by-one pairing (decoding as if the latent were one step less noisy).
        shifted = method.ddim_decode(method.ddim_encode(x, 16), 15, w=0.0)
    assert (latent - x).abs().mean() > 0.05  # the encoding went somewhere
    error = (decoded - x).abs()
    assert error.max() < 0.03 and error.mean() < 0.003
    assert (shifted - x).abs().mean() > 5 * error.mean()


def full_memory_maps(guided, unguided, x):
    """The reference's computation with every step kept: guided, unguided [B, T, K, H, W]."""
    diff = (guided - unguided).square().mean(dim=(3, 4))
    t_e = diff.argmax(dim=1)
    sub = (guided - x[:, None]).square()
    maps = torch.stack(
        [
            torch.stack([sub[b, : max(int(t_e[b, k]), 1), k].mean(0) for k in range(x.shape[1])])
            for b in range(x.shape[0])
        ]
    )
    curve_g = sub.mean(dim=(2, 3, 4))
    curve_u = (unguided - x[:, None]).square().mean(dim=(2, 3, 4))
    cosine = torch.nn.functional.cosine_similarity(curve_g, curve_u, dim=1, eps=1e-6)
    return maps, diff.amax(dim=1), t_e, cosine


def test_streaming_aggregation_equals_full_memory():
    g = torch.Generator().manual_seed(0)
    b, steps, k, h, w = 3, 12, 2, 8, 8
    x = torch.rand(b, k, h, w, generator=g)
    guided = torch.rand(b, steps, k, h, w, generator=g)
    unguided = guided + 0.1 * torch.randn(b, steps, k, h, w, generator=g)
    # slice 0, channel 0: the largest difference at the first step (the t_e = 0 guard);
    # slice 1, channel 1: at the last step; slice 2: a tie, where the first maximum wins.
    unguided[0, 0, 0] = guided[0, 0, 0] + 5.0
    unguided[1, -1, 1] = guided[1, -1, 1] + 5.0
    unguided[2, 4] = guided[2, 4] + 5.0
    unguided[2, 8] = guided[2, 8] + 5.0
    aggregator = ForwardProcessAggregator(x)
    for t in range(steps):
        aggregator.update(guided[:, t], unguided[:, t])
    maps, max_diff, t_e, cosine = full_memory_maps(guided, unguided, x)
    assert aggregator.best_step[0, 0] == 0 and aggregator.best_step[1, 1] == steps - 1
    assert aggregator.best_step[2, 0] == 4
    torch.testing.assert_close(aggregator.best_step, t_e)
    torch.testing.assert_close(aggregator.channel_maps(), maps)
    torch.testing.assert_close(aggregator.best_diff, max_diff)
    torch.testing.assert_close(aggregator.cosine(), cosine)


def test_forward_process_equals_the_transcribed_reference_loop():
    method = fpdm(t_max=700, map_channels=[1])
    images = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        stats = method.forward_process(images)
    anomaly_map, max_diff, cosine = transcribed_forward_process(method, images)
    assert stats.end_step.unique().numel() > 0 and method.n_steps == 4
    torch.testing.assert_close(stats.anomaly_map, anomaly_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.max_diff, max_diff, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(stats.cosine, cosine, atol=1e-5, rtol=1e-5)


def count_unet_calls(method):
    calls: list[int] = []
    method.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_anofpdm_costs_two_evaluations_per_step_in_one_call():
    method = fpdm(num_inference_steps=20, t_max=500)  # stride 50: 10 steps
    calls = count_unet_calls(method)
    method.score(torch.rand(3, 2, 32, 32), torch.ones(3, 1, 32, 32))
    assert method.n_steps == 10
    assert calls == [6] * 10  # one call per step on the [2B] batch: 2 evaluations per slice


def test_ddib_costs_one_encoding_and_two_decoding_evaluations_per_step():
    method = randomised(build_method("ddib", in_channels=2, **{**CFG_TINY, "encode_timestep": 450}))
    calls = count_unet_calls(method)
    method.score(torch.rand(3, 2, 32, 32), torch.ones(3, 1, 32, 32))
    assert method.n_steps == 2  # stride 200: 450 rounds down to 400
    assert calls == [3, 3, 6, 6]


def test_ddib_map_is_the_median_filtered_squared_error_of_its_translation():
    method = randomised(build_method("ddib", in_channels=2, **CFG_TINY, map_channels=[1]))
    images = torch.rand(2, 2, 32, 32)
    out = method.score(images, torch.ones(2, 1, 32, 32))
    with torch.no_grad():
        reconstruction = method.translate(images)
    torch.testing.assert_close(out.reconstruction, reconstruction)
    error = (2 * (images[:, 1] - reconstruction[:, 1])).square()
    torch.testing.assert_close(out.anomaly_map, median_filter_2d(error, 5))
    assert out.anomaly_map.abs().max() > 0


RSS_SCRIPT = textwrap.dedent(
    r"""
    import re, sys, torch
    from brainuad.bench.fpdm import transcribed_forward_process
    from brainuad.methods import build_method

    class CheapUNet(torch.nn.Module):  # memory of the aggregation, not of the network
        def forward(self, x, timesteps, class_labels):
            return 0.1 * x + 0.01 * class_labels[:, None, None, None]

    def peak_kib():  # high-water mark of the resident set since the last reset
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))

    torch.set_num_threads(1)
    t_max, mode = int(sys.argv[1]), sys.argv[2]
    m = build_method("anofpdm", in_channels=2, channels=(8, 16),
                     attention_levels=(False, False), num_res_blocks=1,
                     num_head_channels=8, norm_num_groups=8, t_max=t_max,
                     ema_decay=None).eval()
    m.unet = CheapUNet()
    x = torch.rand(4, 2, 96, 96)
    run = m.forward_process if mode == "stream" else (
        lambda x: transcribed_forward_process(m, x))
    with torch.no_grad():
        m.hparams["t_max"] = 2
        run(x)  # warm-up: allocator pools of one step's tensors
        m.hparams["t_max"] = t_max
        # Reset the high-water mark to the current RSS, so that a higher peak left by the
        # imports (ru_maxrss never goes down) cannot hide the pass's growth.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = peak_kib()
        run(x)
    print(peak_kib() - before)
    """
)


def peak_growth(tmp_path, t_max: int, mode: str) -> int:
    """Peak RSS growth in bytes of one scoring pass, in a fresh process."""
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(t_max), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(run.stdout.strip()) * 1024  # VmHWM is in KiB


def test_peak_memory_is_flat_in_t_max(tmp_path):
    """Measured peak RSS growth, T_max 20 vs 200 (4 slices, 2 map channels, 96 px), each in
    a fresh process; keeping every step's two x̂0 (the reference, transcribed) grows by
    2 × 200 × 4 × 2 × 96² × 4 B ≈ 118 MB, and the measurement sees that."""
    kept = 2 * 200 * 4 * 2 * 96 * 96 * 4
    stream = {t_max: peak_growth(tmp_path, t_max, "stream") for t_max in (20, 200)}
    # Peak RSS of separate processes differs by some MB whatever the algorithm (allocator
    # arenas, lazily loaded code; a bound of kept / 20 ≈ 6 MB failed once on a loaded CI
    # machine): the bound is a quarter of what keeping every step costs, which the
    # full-memory run must exceed by twice that.
    assert abs(stream[200] - stream[20]) < kept / 4, stream
    assert peak_growth(tmp_path, 200, "full") > kept / 2


def test_aggregator_state_does_not_grow_with_steps():
    x = torch.rand(2, 2, 16, 16)

    def state_bytes(steps):
        aggregator = ForwardProcessAggregator(x)
        for _ in range(steps):
            aggregator.update(torch.rand_like(x), torch.rand_like(x))
        return sum(
            v.numel() * v.element_size()
            for v in vars(aggregator).values()
            if isinstance(v, torch.Tensor)
        )

    assert state_bytes(20) == state_bytes(200)


def test_select_constants_from_image_labels():
    cosine = torch.tensor([0.99, 0.98, 0.97, 0.995, 0.5, 0.6, 0.985])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    max_diff = torch.tensor([[0.1, 0.2]] * 4 + [[0.3, 0.9], [0.7, 0.4], [0.2, 0.1]])
    constants = select_constants(cosine, max_diff, labels)
    # The least similar healthy slice always falls below a quantile ≥ 0.005 of the healthy
    # similarities, and the healthy-looking lesion slice (0.985) above any: 2 errors at
    # every q, so the first q wins.
    assert constants["n_misclassified"] == 2
    assert constants["cos_quantile"] == pytest.approx(0.005)
    assert constants["thr_cos"] == pytest.approx(float(torch.quantile(cosine[:4].double(), 0.005)))
    assert 0.6 < constants["thr_cos"] < 0.98  # the two clear lesion slices fall below it
    assert constants["diff_max"] == pytest.approx([0.7, 0.9])
    assert constants["diff_min"] == pytest.approx([0.2, 0.1])
    with pytest.raises(InputError, match="healthy and lesion"):
        select_constants(cosine[:4], max_diff[:4], labels[:4])


def test_slice_thresholds_pick_the_quantile_from_the_difference():
    maps = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    stats = ForwardProcessStatistics(
        anomaly_map=maps[:, 0],
        channel_maps=maps,
        max_diff=torch.tensor([[2.0], [0.0]]),
        end_step=torch.ones(2, 1, dtype=torch.long),
        cosine=torch.tensor([0.5, 0.99]),
    )
    thresholds, is_lesion = slice_thresholds(stats, {"diff_max": [1.0], "thr_cos": 0.9})
    torch.testing.assert_close(thresholds[0], torch.quantile(maps[0].flatten(), 0.90))
    torch.testing.assert_close(thresholds[1], torch.quantile(maps[1].flatten(), 0.98))
    assert is_lesion.tolist() == [True, False]


def test_selection_reads_no_pixel_label(tmp_path, monkeypatch):
    path = tmp_path / "val.h5"
    rng = np.random.default_rng(0)
    with SliceWriter(path, sequences=["t2", "flair"], height=32, width=32) as writer:
        for s in range(2):
            images = rng.random((4, 2, 32, 32)).astype(np.float32)
            seg = np.zeros((4, 32, 32), np.uint8)
            seg[1::2, 10:20, 10:20] = 1  # labels 0, 1, 0, 1
            writer.append_subject(
                f"sub-{s}", images, np.ones((4, 32, 32), np.uint8), seg, np.arange(4)
            )
    opened: list[str] = []
    original = h5py.Group.__getitem__

    def spy(self, name):
        opened.append(name)
        return original(self, name)

    monkeypatch.setattr(h5py.Group, "__getitem__", spy)
    method = fpdm(t_max=400)
    sources = [(path, ["sub-0", "sub-1"])]
    entry = selection_from_slices(method, sources, sequences=["t2", "flair"])
    monkeypatch.undo()
    assert "images" in opened and "seg" not in opened
    chosen_on = entry["chosen_on"]
    assert chosen_on["uses_pixel_labels"] is False and chosen_on["n_lesion_slices"] == 4
    assert chosen_on["read"] == ["images", "label"] and chosen_on["split"] == "val"
    out = tmp_path / "selection.json"
    write_selection(out, entry)
    record = json.loads(out.read_text())
    assert set(record["constants"]) >= {"thr_cos", "diff_max"}
    assert len(record["constants"]["diff_max"]) == 2 and "provenance" in record
    # Changing the pixel labels changes nothing.
    with h5py.File(path, "r+") as f:
        f["seg"][...] = 1 - f["seg"][...]
    again = selection_from_slices(method, sources, sequences=["t2", "flair"])
    assert again["constants"] == entry["constants"]


@pytest.mark.parametrize("name", ["anofpdm", "ddib"])
def test_map_settings_are_checked(name):
    """The map reads existing input channels only, and its median filter has a centre."""
    with pytest.raises(InputError, match="map_channels"):
        build_method(name, in_channels=2, **CFG_TINY, map_channels=[2])
    with pytest.raises(InputError, match="map_channels"):
        build_method(name, in_channels=2, **CFG_TINY, map_channels=[])
    with pytest.raises(InputError, match="median_kernel"):
        build_method(name, in_channels=1, **CFG_TINY, median_kernel=4)
    build_method(name, in_channels=2, **CFG_TINY, map_channels=[0, 1], median_kernel=3)
