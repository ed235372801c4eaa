"""DDIB as AnoFPDM runs it (Su et al., ICLR 2023; SoloChe/AnoFPDM
``scripts/translation_DDIB.py``, ``config/run_translation_brats_ddib.sh``) by its definition,
in float64 numpy with a stand-in ε: x → 2x − 1, DDIM inversion with ∅ to the grid timestep at
or below ``encode_timestep``, decoding toward healthy with guidance w on the same grid, back to
[0, 1], and the map: the median-filtered mean over the map channels of (x − x̂)² on the
model's [−1, 1] scale."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from test_cfg_diffusion_definitions import (
    SHARED_DEFAULTS,
    SHARED_SETTINGS,
    StandInUNet,
    build_default_tiny,
    ddim_decode_np,
    ddim_encode_np,
    linear_alphas_cumprod,
)
from tiny_hparams import CFG_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.ddib import DDIB


def ddib(**kwargs):
    settings = {
        **CFG_TINY,
        "in_channels": 2,
        "num_train_timesteps": 100,
        "num_inference_steps": 10,
        "encode_timestep": 45,
        **kwargs,
    }
    method = build_method("ddib", **settings)
    method.unet = StandInUNet()
    return method.eval()


def translate_np(images: np.ndarray, n_steps: int, stride: int, w: float) -> np.ndarray:
    abar = linear_alphas_cumprod(100)
    latent = ddim_encode_np(images * 2 - 1, n_steps, stride, abar)
    decoded = ddim_decode_np(latent, n_steps, stride, abar, w)
    return np.clip((decoded + 1) / 2, 0, 1)


def test_reference_defaults(monkeypatch):
    """w = 1.1 and L = 450 (``run_translation_brats_ddib.sh``: ``--w 1.1``,
    ``sample_steps 450``), the 5 × 5 median filter, all input channels, the shared model's
    defaults (T = 1000 and every timestep, so L stays 450)."""
    build_default_tiny(monkeypatch)
    method = DDIB()
    assert method.name == "ddib" and method.has_reconstruction
    assert method.supervision == "image_labels"
    hp = method.hparams
    assert hp["guidance_scale"] == 1.1 and hp["encode_timestep"] == 450
    assert hp["map_channels"] is None and hp["median_kernel"] == 5
    assert {key: hp[key] for key in SHARED_DEFAULTS} == SHARED_DEFAULTS
    assert method.n_steps == 450
    assert DDIB.scoring_hparams == {
        "guidance_scale",
        "encode_timestep",
        "map_channels",
        "median_kernel",
        "num_inference_steps",
        "score_seed",
    }


def test_every_hyperparameter_is_recorded():
    settings = {
        **SHARED_SETTINGS,
        "guidance_scale": 3,
        "encode_timestep": 60,
        "map_channels": (2, 0),
        "median_kernel": 3,
    }
    method = build_method("ddib", **settings)
    assert method.hparams == {**settings, "guidance_scale": 3.0, "map_channels": [2, 0]}
    assert isinstance(method.hparams["guidance_scale"], float)
    assert method.ema.decay == 0.5 and method.stride == 5 and method.n_steps == 12
    assert {block.conv2[0].p for block in method.unet.modules() if hasattr(block, "conv2")} == {0.2}


@pytest.mark.parametrize(("encode_timestep", "n_steps"), [(45, 4), (10, 1), (99, 9), (40, 4)])
def test_encoding_reaches_the_grid_timestep_at_or_below_l(encode_timestep, n_steps):
    method = ddib(encode_timestep=encode_timestep)
    assert method.stride == 10 and method.n_steps == n_steps


@pytest.mark.parametrize("encode_timestep", [9, 0, 100, 150])
def test_encode_timestep_outside_the_grid_is_refused(encode_timestep):
    with pytest.raises(
        InputError,
        match=rf"encode_timestep={encode_timestep}, expected at least one grid step \(10\) "
        r"and below num_train_timesteps \(100\)",
    ):
        ddib(encode_timestep=encode_timestep)


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"map_channels": [2]}, "map_channels"), ({"median_kernel": 2}, "median_kernel")],
)
def test_map_settings_are_checked_against_the_inputs(settings, match):
    with pytest.raises(InputError, match=match):
        ddib(**settings)


@pytest.mark.parametrize(("w", "encode_timestep"), [(1.1, 45), (0.0, 30), (3.0, 99)])
def test_translation_against_float64(w, encode_timestep):
    method = ddib(guidance_scale=w, encode_timestep=encode_timestep)
    images = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    out = method.translate(images)
    expected = translate_np(images.double().numpy(), encode_timestep // 10, 10, w)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=2e-5)
    n = encode_timestep // 10
    # ∅ for the n encoding steps; then, per decoding step, healthy (with ∅ when w ≠ 0).
    labels = [call[1] for call in method.unet.calls]
    assert labels[:n] == [[2, 2]] * n
    assert labels[n:] == ([[0, 0]] if w == 0 else [[2, 2, 0, 0]]) * n


def test_translation_maps_back_to_the_unit_interval_clamped():
    """x̂ = clamp((x̂_{[−1, 1]} + 1) / 2, 0, 1) of the decoding, which takes the encoder's
    latent, the grid steps of L and the guidance w."""
    method = ddib(guidance_scale=2.5, encode_timestep=30)
    seen = []

    def encode(x, n_steps):
        seen.append(("encode", x.clone(), n_steps))
        return x + 10

    def decode(latent, n_steps, w):
        seen.append(("decode", latent.clone(), n_steps, w))
        return torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 2, 3)

    method.ddim_encode, method.ddim_decode = encode, decode
    images = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1]).reshape(1, 1, 2, 3)
    out = method.translate(images)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(seen[0][1], images * 2 - 1)
    assert seen[0][2] == 3 and seen[1][2:] == (3, 2.5)
    torch.testing.assert_close(seen[1][1], images * 2 + 9)


@pytest.mark.parametrize(("map_channels", "kernel"), [(None, 5), ([1], 3), ([1, 0], 1)])
def test_score_is_the_filtered_squared_error_on_the_model_scale(map_channels, kernel):
    method = ddib(map_channels=map_channels, median_kernel=kernel)
    images = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    out = method.score(images, torch.ones(2, 1, 8, 8))
    x = images.double().numpy()
    reconstruction = translate_np(x, 4, 10, 1.1)
    np.testing.assert_allclose(out.reconstruction.numpy(), reconstruction, rtol=1e-4, atol=2e-5)
    channels = map_channels or [0, 1]
    error = ((2 * x - 2 * reconstruction)[:, channels] ** 2).mean(axis=1)
    expected = scipy.ndimage.median_filter(error, size=(1, kernel, kernel), mode="mirror")
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected, rtol=1e-4, atol=1e-5)
