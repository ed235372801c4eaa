"""AnoFPDM (Che et al., arXiv 2404.15683, Sec. 3; SoloChe/AnoFPDM) by its definition, in
float64 numpy with a stand-in ε, written from the reference (``gaussian_diffusion.py``
``calc_pred_xstart_loop``, ``scripts/obtain_hyperpara.py`` ``cal_cos_and_abe_range`` and
``get_mask_batch_FPDM``) with every step kept: the deterministic forward process with ∅, the
guided (w) and unguided (w = 0, the healthy conditional) x̂0 at each grid timestep below
``t_max``, t_e = argmax_t mean_hw (x̂0^g − x̂0^u)² per channel, the map = mean over t < t_e of
(x̂0^g − x)², the cosine similarity of the two MSE-vs-t curves; the label-free selection of
``thr_cos`` and ``diff_max``, the per-slice quantile thresholds, and the selection record."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
from test_cfg_diffusion_definitions import (
    HEALTHY,
    NULL,
    SHARED_DEFAULTS,
    SHARED_SETTINGS,
    StandInUNet,
    build_default_tiny,
    epsilon_np,
    linear_alphas_cumprod,
    x0_np,
)
from tiny_hparams import CFG_TINY

from brainuad.errors import InputError
from brainuad.methods import anofpdm, build_method
from brainuad.methods.anofpdm import (
    AnoFPDM,
    ForwardProcessAggregator,
    ForwardProcessStatistics,
    select_constants,
    select_for_fold,
    selection_from_slices,
    slice_thresholds,
    write_selection,
)
from brainuad.slices.hdf5 import SliceWriter
from brainuad.slices.splits import write_splits


def fpdm(**kwargs):
    settings = {
        **CFG_TINY,
        "in_channels": 2,
        "num_train_timesteps": 100,
        "num_inference_steps": 10,
        "t_max": 45,
        **kwargs,
    }
    method = build_method("anofpdm", **settings)
    method.unet = StandInUNet()
    return method.eval()


def forward_process_np(images, channels, w, n_steps, stride, kernel):
    """The reference's loop with every step kept, on a consistent DDIM inversion."""
    abar = linear_alphas_cumprod(100)
    x = images * 2 - 1
    sample, guided, unguided = x, [], []
    for k in range(n_steps):
        t = k * stride
        eps_null, eps_healthy = epsilon_np(sample, t, NULL), epsilon_np(sample, t, HEALTHY)
        guided.append(x0_np(sample, (1 + w) * eps_healthy - w * eps_null, abar[t])[:, channels])
        unguided.append(x0_np(sample, eps_healthy, abar[t])[:, channels])
        if k + 1 < n_steps:
            nxt = abar[t + stride]
            x0 = x0_np(sample, eps_null, abar[t])
            sample = np.sqrt(nxt) * x0 + np.sqrt(1 - nxt) * eps_null
    g, u = np.stack(guided, 1), np.stack(unguided, 1)  # [B, T, K, H, W]
    diff = ((g - u) ** 2).mean(axis=(3, 4))  # [B, T, K]
    t_e = diff.argmax(axis=1)
    sub = (g - x[:, None, channels]) ** 2
    maps = np.empty((x.shape[0], len(channels), *x.shape[2:]))
    for b in range(x.shape[0]):
        for c in range(len(channels)):
            maps[b, c] = sub[b, : t_e[b, c], c].mean(0) if t_e[b, c] > 0 else sub[b, 0, c]
    curve_g = sub.mean(axis=(2, 3, 4))
    curve_u = ((u - x[:, None, channels]) ** 2).mean(axis=(2, 3, 4))
    norms = np.maximum(np.linalg.norm(curve_g, axis=1), 1e-6) * np.maximum(
        np.linalg.norm(curve_u, axis=1), 1e-6
    )
    cosine = (curve_g * curve_u).sum(axis=1) / norms
    anomaly = scipy.ndimage.median_filter(maps.mean(1), size=(1, kernel, kernel), mode="mirror")
    return anomaly, maps, diff.max(axis=1), t_e, cosine


def test_reference_defaults(monkeypatch):
    """w = 2 and 600 forward steps (``run_translation_brats_fpdm.sh``: ``--w 2``,
    ``forward_steps=600``), the 5 × 5 median filter, all inputs, the paper's every timestep."""
    build_default_tiny(monkeypatch)
    method = AnoFPDM()
    assert method.name == "anofpdm" and not method.has_reconstruction
    assert method.supervision == "image_labels"
    hp = method.hparams
    assert hp["guidance_scale"] == 2.0 and hp["t_max"] == 600
    assert hp["map_channels"] is None and hp["median_kernel"] == 5
    assert {key: hp[key] for key in SHARED_DEFAULTS} == SHARED_DEFAULTS
    assert method.n_steps == 600
    assert AnoFPDM.scoring_hparams == {
        "guidance_scale",
        "t_max",
        "map_channels",
        "median_kernel",
        "num_inference_steps",
        "score_seed",
    }


def test_every_hyperparameter_is_recorded():
    settings = {
        **SHARED_SETTINGS,
        "guidance_scale": 20,
        "t_max": 61,
        "map_channels": (2, 0),
        "median_kernel": 3,
    }
    method = build_method("anofpdm", **settings)
    assert method.hparams == {**settings, "guidance_scale": 20.0, "map_channels": [2, 0]}
    assert isinstance(method.hparams["guidance_scale"], float)
    assert method.ema.decay == 0.5 and method.stride == 5 and method.n_steps == 13
    assert {block.conv2[0].p for block in method.unet.modules() if hasattr(block, "conv2")} == {0.2}


@pytest.mark.parametrize(("t_max", "n_steps"), [(45, 5), (40, 4), (41, 5), (1, 1), (100, 10)])
def test_forward_process_visits_the_grid_timesteps_below_t_max(t_max, n_steps):
    method = fpdm(t_max=t_max)
    method.forward_process(torch.rand(1, 2, 4, 4))
    assert method.n_steps == n_steps
    assert [call[0] for call in method.unet.calls] == [[10 * k] * 2 for k in range(n_steps)]
    assert all(call[1] == [NULL, HEALTHY] for call in method.unet.calls)


@pytest.mark.parametrize("t_max", [0, -5, 101])
def test_t_max_outside_the_schedule_is_refused(t_max):
    expected = rf"t_max={t_max}, expected 1 … num_train_timesteps \(100\)"
    with pytest.raises(InputError, match=expected):
        fpdm(t_max=t_max)


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"map_channels": [2]}, "map_channels"), ({"median_kernel": 2}, "median_kernel")],
)
def test_map_settings_are_checked_against_the_inputs(settings, match):
    with pytest.raises(InputError, match=match):
        fpdm(**settings)


@pytest.mark.parametrize(
    ("settings", "channels", "kernel"),
    [
        ({}, [0, 1], 5),
        ({"map_channels": [1], "guidance_scale": 20.0, "t_max": 100}, [1], 5),
        ({"map_channels": [1, 0], "guidance_scale": 0.5, "median_kernel": 3}, [1, 0], 3),
    ],
)
def test_forward_process_against_float64(settings, channels, kernel):
    method = fpdm(**settings)
    images = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(11))
    stats = method.forward_process(images)
    w = method.hparams["guidance_scale"]
    anomaly, maps, max_diff, t_e, cosine = forward_process_np(
        images.double().numpy(), channels, w, method.n_steps, 10, kernel
    )
    assert len(np.unique(t_e)) > 1 and (t_e > 1).any()  # maps over several steps
    np.testing.assert_array_equal(stats.end_step.numpy(), t_e)
    np.testing.assert_allclose(stats.channel_maps.numpy(), maps, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.max_diff.numpy(), max_diff, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats.cosine.numpy(), cosine, rtol=1e-4)
    np.testing.assert_allclose(stats.anomaly_map.numpy(), anomaly, rtol=1e-4, atol=1e-6)
    out = method.score(images, torch.ones(3, 1, 6, 6))
    torch.testing.assert_close(out.anomaly_map, stats.anomaly_map)
    assert out.reconstruction is None


def test_aggregator_without_a_step_and_with_zero_curves():
    x = torch.zeros(1, 1, 2, 2)
    aggregator = ForwardProcessAggregator(x)
    with pytest.raises(RuntimeError, match=r"^ForwardProcessAggregator: no step was added$"):
        aggregator.channel_maps()
    aggregator.update(x.clone(), x.clone())  # x̂0 = x: both MSE curves are zero
    assert aggregator.cosine().item() == 0.0  # not NaN: each norm is clamped at 1e-6
    assert aggregator.cosine().dtype == torch.float32
    assert torch.equal(aggregator.channel_maps(), torch.zeros_like(x))


def test_cosine_sums_keep_the_resolution_of_similarities_near_one():
    """Over 600 steps the MSE curves of one slice are nearly parallel (1 − cos ≈ 4e−7): the
    running sums are float64, so the cosine is right to a float32 step (6e−8) near 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, 4, 4)
    aggregator = ForwardProcessAggregator(x)
    curve_g, curve_u = [], []
    for k in range(600):
        guided = torch.rand(4, 1, 4, 4, generator=g) * (1 + k / 100)
        unguided = guided + 0.01 * torch.rand(4, 1, 4, 4, generator=g)
        aggregator.update(guided, unguided)
        curve_g.append(guided.square().mean(dim=(1, 2, 3)).double().numpy())
        curve_u.append(unguided.square().mean(dim=(1, 2, 3)).double().numpy())
    cg, cu = np.array(curve_g), np.array(curve_u)
    expected = (cg * cu).sum(0) / np.sqrt((cg**2).sum(0) * (cu**2).sum(0))
    assert (1 - expected < 1e-6).all()
    np.testing.assert_allclose(aggregator.cosine().double().numpy(), expected, rtol=0, atol=5e-8)


def cal_cos_and_abe_range_np(cosine, max_diff, labels):
    """``obtain_hyperpara.py``'s ``cal_cos_and_abe_range``: the quantile q of the healthy
    similarities with the fewest (lesion > thr) + (healthy < thr), the first on ties."""
    healthy, lesion = cosine[labels == 0], cosine[labels == 1]
    n_min, thr, q_best = None, None, None
    for q in np.linspace(0.005, 0.095, 100):
        threshold = np.quantile(healthy, q)
        n = int((lesion > threshold).sum() + (healthy < threshold).sum())
        if n_min is None or n < n_min:
            n_min, thr, q_best = n, threshold, q
    lesion_max = max_diff[labels == 1]
    return thr, q_best, n_min, lesion_max.max(0), lesion_max.min(0)


def test_select_constants_against_the_reference_rule():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 60 + [1] * 20)
    cosine = np.concatenate([rng.normal(0.97, 0.01, 60), rng.normal(0.95, 0.02, 20)])
    max_diff = rng.random((80, 2))
    _, q, n_min, dmax, dmin = cal_cos_and_abe_range_np(cosine, max_diff, labels)
    assert 0.005 < q < 0.095  # an interior quantile wins
    constants = select_constants(
        torch.from_numpy(cosine).float(), torch.from_numpy(max_diff), torch.from_numpy(labels)
    )
    assert constants["n_misclassified"] == n_min
    assert constants["cos_quantile"] == pytest.approx(q)
    assert constants["thr_cos"] == pytest.approx(
        np.quantile(cosine.astype(np.float32).astype(np.float64)[labels == 0], q)
    )
    assert constants["diff_max"] == pytest.approx(dmax.tolist())
    assert constants["diff_min"] == pytest.approx(dmin.tolist())
    assert set(constants) == {"thr_cos", "cos_quantile", "n_misclassified", "diff_max", "diff_min"}


def test_select_constants_counts_ties_at_the_threshold_as_correct():
    """Strict comparisons, as the reference: a healthy slice at the threshold is not below
    it and a lesion slice at it is not above it (ties occur: identical slices, e.g. empty
    ones, have identical curves)."""
    cosine = torch.tensor([0.9] * 5 + [0.99] * 5 + [0.9, 0.5])
    labels = torch.tensor([0] * 10 + [1, 1])
    constants = select_constants(cosine, torch.ones(12, 1), labels)
    assert constants["thr_cos"] == pytest.approx(0.9) and constants["n_misclassified"] == 0
    assert constants["cos_quantile"] == pytest.approx(0.005)


def test_select_constants_needs_both_kinds_of_slice():
    with pytest.raises(InputError, match="got 3 healthy and 0 lesion slice"):
        select_constants(torch.rand(3), torch.rand(3, 1), torch.zeros(3))
    with pytest.raises(InputError, match="got 0 healthy and 2 lesion slice"):
        select_constants(torch.rand(2), torch.rand(2, 1), torch.ones(2))


def test_slice_thresholds_against_get_mask_batch():
    """Per slice: q = flip(linspace(0.90, 0.98, 101))[round(clamp(max_t D / diff_max, 0, 1),
    2) · 100] per channel, the threshold the mean over channels of each map's q-quantile,
    and the slice a lesion slice when its cosine ≤ thr_cos."""
    rng = np.random.default_rng(4)
    b, k = 5, 2
    maps = rng.random((b, k, 6, 6)).astype(np.float32)
    max_diff = np.array([[0.5, 0.1], [3.0, 0.0], [0.126, 0.1504], [1.0, 0.2], [0.01, 0.9]])
    cosine = np.array([0.5, 0.9, 0.91, 0.95, 0.89])
    constants = {"diff_max": [1.0, 0.4], "thr_cos": 0.9}
    stats = ForwardProcessStatistics(
        anomaly_map=torch.from_numpy(maps.mean(1)),
        channel_maps=torch.from_numpy(maps),
        max_diff=torch.from_numpy(max_diff).float(),
        end_step=torch.zeros(b, k, dtype=torch.long),
        cosine=torch.from_numpy(cosine).float(),
    )
    thresholds, is_lesion = slice_thresholds(stats, constants)
    quantiles = np.linspace(0.90, 0.98, 101)[::-1]
    ratio = np.clip(max_diff / np.array(constants["diff_max"]), 0, 1)
    # Two decimals: 0.126 → 0.13 and 0.376 → 0.38 (none sits on a rounding edge).
    index = np.rint(ratio * 100).astype(int)
    expected = np.array(
        [
            np.mean([np.quantile(maps[i, c].ravel(), quantiles[index[i, c]]) for c in range(k)])
            for i in range(b)
        ]
    )
    np.testing.assert_allclose(thresholds.numpy(), expected, rtol=1e-5)
    assert is_lesion.tolist() == [True, True, False, False, True]


def write_slices(path, subjects, n_slices=4, size=16):
    rng = np.random.default_rng(0)
    with SliceWriter(path, sequences=["t2", "flair"], height=size, width=size) as writer:
        for subject in subjects:
            images = rng.random((n_slices, 2, size, size)).astype(np.float32)
            seg = np.zeros((n_slices, size, size), np.uint8)
            seg[1::2, 4:10, 4:10] = 1  # labels 0, 1, 0, 1
            writer.append_subject(
                subject, images, np.ones((n_slices, size, size), np.uint8), seg, np.arange(n_slices)
            )
    with h5py.File(path, "r") as f:
        return f["images"][:], f["label"][:]


def recording_forward_process(seen):
    """Per-slice statistics computed from the images themselves: cosine = mean of channel 0,
    max_diff = each channel's maximum."""

    def forward_process(images):
        seen.append(images.clone())
        b, k = images.shape[:2]
        return ForwardProcessStatistics(
            anomaly_map=images.mean(1),
            channel_maps=images,
            max_diff=images.flatten(2).amax(2),
            end_step=torch.zeros(b, k, dtype=torch.long),
            cosine=images[:, 0].mean(dim=(1, 2)),
        )

    return forward_process


def test_selection_pools_the_sources_in_batches_of_the_chosen_channels(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    images_a, labels_a = write_slices(a, ["s1", "s2", "s3"])
    images_b, labels_b = write_slices(b, ["t1"])
    method = fpdm(t_max=30, guidance_scale=1.5, map_channels=[1])
    method.train()
    seen: list[torch.Tensor] = []
    method.forward_process = recording_forward_process(seen)
    entry = selection_from_slices(
        method, [(a, ["s3", "s1"]), (b, ["t1"])], sequences=["flair", "t2"], batch_size=3
    )
    assert method.training  # the mode is restored
    assert [len(x) for x in seen] == [3, 3, 2, 3, 1]
    # Rows of s1 and s3 (file order), then t1; channels in the asked order (flair, t2).
    rows = np.r_[0:4, 8:12]
    expected_images = np.concatenate([images_a[rows], images_b])[:, ::-1]
    np.testing.assert_array_equal(torch.cat(seen).numpy(), expected_images)
    labels = torch.from_numpy(np.concatenate([labels_a[rows], labels_b]).astype(np.int64))
    images = torch.from_numpy(expected_images.copy())
    expected = select_constants(images[:, 0].mean(dim=(1, 2)), images.flatten(2).amax(2), labels)
    assert entry["constants"] == expected
    assert entry["hparams"] == {
        "guidance_scale": 1.5,
        "t_max": 30,
        "num_inference_steps": 10,
        "map_channels": [1],
    }
    assert entry["chosen_on"] == {
        "split": "val",
        "sources": [
            {"slice_file": str(a), "subjects": ["s1", "s3"], "slices": 8},
            {"slice_file": str(b), "subjects": ["t1"], "slices": 4},
        ],
        "n_slices": 12,
        "n_lesion_slices": 6,
        "read": ["images", "label"],
        "uses_pixel_labels": False,
        "uses_test_data": False,
    }


def test_selection_resizes_to_the_working_size_and_keeps_eval_mode(tmp_path):
    path = tmp_path / "a.h5"
    write_slices(path, ["s1"])
    method = fpdm()
    seen: list[torch.Tensor] = []
    method.forward_process = recording_forward_process(seen)
    selection_from_slices(method, [(path, ["s1"])], size=8)
    assert seen[0].shape == (4, 2, 8, 8) and not method.training
    seen.clear()
    selection_from_slices(method, [(path, ["s1"])])
    assert seen[0].shape == (4, 2, 16, 16)  # default: all channels, batch 16, native size


def test_selection_batches_of_16_by_default_on_the_methods_device(tmp_path):
    path = tmp_path / "a.h5"
    write_slices(path, [f"s{i}" for i in range(5)])  # 20 slices
    method = fpdm().to("meta")
    devices, sizes = [], []

    def forward_process(images):
        devices.append(images.device.type)
        sizes.append(len(images))
        b = len(images)
        return ForwardProcessStatistics(
            anomaly_map=torch.zeros(b, 16, 16),
            channel_maps=torch.zeros(b, 2, 16, 16),
            max_diff=torch.ones(b, 2),
            end_step=torch.zeros(b, 2, dtype=torch.long),
            cosine=torch.linspace(0, 1, b),
        )

    method.forward_process = forward_process
    selection_from_slices(method, [(path, [f"s{i}" for i in range(5)])])
    assert sizes == [16, 4] and devices == ["meta", "meta"]


def test_select_for_fold_hands_its_settings_on(tmp_path, monkeypatch):
    """The loaded model goes to the resolved device ("auto" by default), and the inputs,
    size and batch size (16 by default) reach the selection."""
    model_path = tmp_path / "model.pt"
    build_method("anofpdm", in_channels=2, **CFG_TINY).save(model_path)
    splits = tmp_path / "splits.csv"
    write_splits(pd.DataFrame({"subject": ["s1"], "split": ["val"], "fold": [0]}), splits)
    asked, calls = [], []

    def resolve_device(device):
        asked.append(device)
        return torch.device("meta")

    def selection(method, pairs, **kwargs):
        calls.append((next(method.parameters()).device.type, pairs, kwargs))
        return {"constants": {}}

    monkeypatch.setattr("brainuad.training.device.resolve_device", resolve_device)
    monkeypatch.setattr(anofpdm, "selection_from_slices", selection)
    out = tmp_path / "selection.json"
    select_for_fold(model_path=model_path, sources=[("x.h5", splits)], fold=0, out_path=out)
    select_for_fold(
        model_path=model_path,
        sources=[("x.h5", splits)],
        fold=0,
        out_path=out,
        inputs=["flair"],
        size=8,
        batch_size=3,
        device="cuda:1",
    )
    assert asked == ["auto", "cuda:1"]
    assert calls == [
        ("meta", [("x.h5", ["s1"])], {"sequences": None, "size": None, "batch_size": 16}),
        ("meta", [("x.h5", ["s1"])], {"sequences": ["flair"], "size": 8, "batch_size": 3}),
    ]


def test_write_selection_is_sorted_json_with_provenance_and_atomic(tmp_path):
    out = tmp_path / "selection.json"
    write_selection(out, {"constants": {"thr_cos": 0.5}, "b": 1, "a": [1, 2]})
    text = out.read_text()
    record = json.loads(text)
    assert text.endswith("}\n") and text.startswith('{\n  "a": [\n    1,')
    assert list(record) == ["a", "b", "constants", "provenance"]
    assert set(record["provenance"]) == {"git_commit", "versions", "machine"}
    with pytest.raises(TypeError):
        write_selection(out, {"bad": object()})
    assert out.read_text() == text  # the failed write left the old record
    assert os.listdir(tmp_path) == ["selection.json"]


def test_select_for_fold_reads_the_folds_val_subjects(tmp_path):
    slices = tmp_path / "brats.h5"
    write_slices(slices, ["s1", "s2", "s3"])
    splits = tmp_path / "splits.csv"
    write_splits(
        pd.DataFrame(
            {
                "subject": ["s1", "s2", "s3", "s1", "s2", "s3"],
                "split": ["val", "train", "val", "train", "val", "test"],
                "fold": [0, 0, 0, 1, 1, 1],
            }
        ),
        splits,
    )
    model = build_method(
        "anofpdm", in_channels=2, **{**CFG_TINY, "num_inference_steps": 10, "t_max": 100}
    )
    model_path = tmp_path / "model.pt"
    model.save(model_path)
    out = tmp_path / "selection.json"
    entry = select_for_fold(
        model_path=model_path,
        sources=[(slices, splits)],
        fold=1,
        out_path=out,
        inputs=["flair", "t2"],
        size=8,
        batch_size=2,
        device="cpu",
    )
    assert entry["chosen_on"]["sources"] == [
        {"slice_file": str(slices), "subjects": ["s2"], "slices": 4}
    ]
    assert entry["model"] == str(model_path)
    record = json.loads(out.read_text())
    assert {k: v for k, v in record.items() if k != "provenance"} == json.loads(json.dumps(entry))
    # The same constants as selecting directly with the loaded model on those slices.
    direct = selection_from_slices(
        AnoFPDM.load(model_path), [(slices, ["s2"])], sequences=["flair", "t2"], size=8
    )
    assert entry["constants"] == direct["constants"]
    ddib_path = tmp_path / "ddib.pt"
    build_method("ddib", in_channels=2, **CFG_TINY).save(ddib_path)
    with pytest.raises(InputError, match=r"method 'ddib', expected an anofpdm model"):
        select_for_fold(model_path=ddib_path, sources=[], fold=0, out_path=out)
