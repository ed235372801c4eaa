"""The classifier-free guided model AnoFPDM and DDIB share (Ho & Salimans, arXiv 2207.12598,
as SoloChe/AnoFPDM uses it) by its definition, written out in float64 numpy independently of
the implementation: the guided noise (1 + w) ε(y) − w ε(∅) (``gaussian_diffusion.py``,
``condition_clf_free``), the ε objective with the label replaced by ∅ with probability
``label_dropout`` (``unet_v2.py``: ``th.rand(B) < threshold``), x̂0 clipped to [−1, 1], DDIM
inversion and decoding on one strided grid (Song et al., arXiv 2010.02502, eq. 12 with η = 0),
the reflect-padded median filter (``scripts/evaluate.py``, ``median_pool``), the EMA of the
weights, and the reference's defaults (``config/run_train_brats_clf_free_guided.sh``,
``guided_diffusion/script_util.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from tiny_hparams import CFG_TINY

from brainuad.errors import InputError
from brainuad.methods import cfg_diffusion
from brainuad.methods.cfg_diffusion import (
    HEALTHY,
    LESION,
    NULL,
    add_resblock_dropout,
    check_map_settings,
    guided_epsilon,
    median_filter_2d,
)
from brainuad.methods.diffusion_unet import build_diffusion_unet

# The stand-in ε's label offsets: healthy, lesion, ∅ (all different, none zero).
LABEL_OFFSET = (0.3, -0.2, 0.1)


class StandInUNet(torch.nn.Module):
    """ε(x, t, y) = 0.2 x + 8e−4 t + c_y (1 + x²)(1 + cos(0.07 t + 4 m)), m the mean of x over
    each image channel (so the guided/unguided difference peaks at a t that depends on the
    slice and channel), recording every call's t and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the method's device comes from it
        self.calls: list[tuple[list[int], list[int], tuple[int, ...]]] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, timesteps, class_labels=None):
        self.calls.append((timesteps.tolist(), class_labels.tolist(), tuple(x.shape)))
        self.inputs.append(x.detach().clone())
        offset = torch.tensor(LABEL_OFFSET, dtype=x.dtype)[class_labels][:, None, None, None]
        t = timesteps[:, None, None, None].to(x.dtype)
        wave = 1 + torch.cos(0.07 * t + 4 * x.mean(dim=(2, 3), keepdim=True))
        return 0.2 * x + 8e-4 * t + offset * (1 + x**2) * wave


def epsilon_np(x: np.ndarray, t: int, label: int) -> np.ndarray:
    wave = 1 + np.cos(0.07 * t + 4 * x.mean(axis=(2, 3), keepdims=True))
    return 0.2 * x + 8e-4 * t + LABEL_OFFSET[label] * (1 + x**2) * wave


def linear_alphas_cumprod(n_timesteps: int) -> np.ndarray:
    """ᾱ of the linear β schedule 1e−4 … 0.02 (DDPM, Ho et al. 2020; the reference's
    ``get_named_beta_schedule("linear", 1000)``)."""
    return np.cumprod(1 - np.linspace(1e-4, 0.02, n_timesteps))


def x0_np(sample: np.ndarray, eps: np.ndarray, abar: float) -> np.ndarray:
    return np.clip((sample - np.sqrt(1 - abar) * eps) / np.sqrt(abar), -1, 1)


def ddim_encode_np(x, n_steps, stride, abar):
    for k in range(n_steps):
        t = k * stride
        eps = epsilon_np(x, t, NULL)
        x = np.sqrt(abar[t + stride]) * x0_np(x, eps, abar[t]) + np.sqrt(1 - abar[t + stride]) * eps
    return x


def ddim_decode_np(x, n_steps, stride, abar, w):
    for k in range(n_steps, 0, -1):
        t = k * stride
        eps = (1 + w) * epsilon_np(x, t, HEALTHY) - w * epsilon_np(x, t, NULL)
        prev = abar[t - stride]
        x = np.sqrt(prev) * x0_np(x, eps, abar[t]) + np.sqrt(1 - prev) * eps
    return x


class Shared(cfg_diffusion.ClassifierFreeDiffusion):
    """The shared base with a scoring stub (it is abstract on its own)."""

    def _score(self, images, brainmask, generator):
        raise NotImplementedError


def shared(**kwargs):
    return Shared(**{"in_channels": 1, **CFG_TINY, **kwargs})


def stand_in(**kwargs):
    method = shared(**{"in_channels": 2, **kwargs})
    method.unet = StandInUNet()
    return method.eval()


def test_guided_epsilon_is_the_references_form():
    """(1 + w) ε_c − w ε_∅, for every w including 1 and negative ones; w = 0 is ε_c."""
    rng = np.random.default_rng(0)
    cond, null = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    for w in (0.0, 1.0, 1.1, 2.0, 20.0, -0.5):
        got = guided_epsilon(torch.from_numpy(cond), torch.from_numpy(null), w)
        np.testing.assert_allclose(got.numpy(), (1 + w) * cond - w * null, rtol=1e-12)


@pytest.mark.parametrize("kernel", [3, 5])
def test_median_filter_is_scipys_with_mirror_padding(kernel):
    """torch's ``reflect`` pad (the reference's ``median_pool``) is scipy's ``mirror``; each
    map is filtered alone."""
    maps = torch.rand(3, 9, 12, generator=torch.Generator().manual_seed(kernel))
    expected = scipy.ndimage.median_filter(maps.numpy(), size=(1, kernel, kernel), mode="mirror")
    out = median_filter_2d(maps, kernel)
    assert out.shape == maps.shape
    np.testing.assert_array_equal(out.numpy(), expected)


def test_median_filter_of_kernel_one_is_the_identity():
    maps = torch.rand(2, 5, 5)
    assert torch.equal(median_filter_2d(maps, 1), maps)


def test_map_settings_refusals_name_the_setting():
    check_map_settings(None, 1, in_channels=1)
    check_map_settings([0, 2], 3, in_channels=3)
    check_map_settings([1], 7, in_channels=2)
    for bad in ([], [3], [-1], [0, 3]):
        with pytest.raises(InputError, match=r"map_channels=\[.*\], expected indices of the 3"):
            check_map_settings(bad, 5, in_channels=3)
    for kernel in (0, -1, 2, 6):
        with pytest.raises(InputError, match=f"median_kernel={kernel}, expected odd"):
            check_map_settings(None, kernel, in_channels=1)


def tiny_unet():
    return build_diffusion_unet(in_channels=1, num_class_embeds=3, **cfg_unet_kwargs())


def cfg_unet_kwargs():
    keys = ("channels", "attention_levels", "num_res_blocks", "num_head_channels")
    return {**{k: CFG_TINY[k] for k in keys}, "norm_num_groups": CFG_TINY["norm_num_groups"]}


def resnet_blocks(unet):
    return [m for m in unet.modules() if type(m).__name__ == "DiffusionUNetResnetBlock"]


def test_resblock_dropout_sits_before_every_second_convolution():
    unet = tiny_unet()
    blocks = resnet_blocks(unet)
    convs = [block.conv2 for block in blocks]
    add_resblock_dropout(unet, 0.3)
    assert len(blocks) > 4
    for block, conv in zip(blocks, convs, strict=True):
        assert isinstance(block.conv2, torch.nn.Sequential) and len(block.conv2) == 2
        assert isinstance(block.conv2[0], torch.nn.Dropout) and block.conv2[0].p == 0.3
        assert block.conv2[1] is conv
    # p = 0 (and below) adds nothing.
    for p in (0.0, -0.1):
        plain = tiny_unet()
        add_resblock_dropout(plain, p)
        assert not any(isinstance(b.conv2[0], torch.nn.Dropout) for b in resnet_blocks(plain))


def test_dropout_hyperparameter_reaches_the_unet_and_acts_in_training_only():
    method = shared(**{"dropout": 0.4})
    assert {block.conv2[0].p for block in resnet_blocks(method.unet)} == {0.4}
    none = shared(**{"dropout": 0.0})
    assert not any(isinstance(b.conv2[0], torch.nn.Dropout) for b in resnet_blocks(none.unet))


#: The shared model's defaults (the reference's ADM at 128², its training settings), which
#: AnoFPDM and DDIB inherit.
SHARED_DEFAULTS = {
    "in_channels": 1,
    "channels": (128, 128, 256, 384, 512),
    "attention_levels": (False, False, True, True, True),
    "num_res_blocks": 2,
    "num_head_channels": (32, 32, 64, 96, 128),
    "norm_num_groups": 32,
    "resblock_updown": True,
    "dropout": 0.1,
    "label_dropout": 0.1,
    "num_train_timesteps": 1000,
    "num_inference_steps": 1000,
    "score_seed": 0,
    "optimizer": "adamw",
    "weight_decay": 0.0,
    "ema_decay": 0.9999,
}

#: A tiny build with every shared setting away from its default.
SHARED_SETTINGS = {
    "in_channels": 3,
    "channels": (8, 16),
    "attention_levels": (False, True),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "resblock_updown": False,
    "dropout": 0.2,
    "label_dropout": 0.3,
    "num_train_timesteps": 100,
    "num_inference_steps": 20,
    "score_seed": 4,
    "optimizer": "adam",
    "weight_decay": 0.01,
    "ema_decay": 0.5,
}


def build_default_tiny(monkeypatch) -> None:
    """Make a default build cheap: the UNet's arguments are kept in ``hparams``, but the
    network itself is built tiny."""
    monkeypatch.setattr(
        cfg_diffusion,
        "build_diffusion_unet",
        lambda **kw: build_diffusion_unet(
            in_channels=kw["in_channels"], num_class_embeds=3, **cfg_unet_kwargs()
        ),
    )


def test_reference_defaults_reach_their_parts(monkeypatch):
    """A default build (the network's size recorded, built tiny): the reference's ADM at 128²
    (``script_util.py``: 128 × (1, 1, 2, 3, 4), 2 res blocks, attention at 32/16/8, 4 heads,
    resblock up/down), dropout 0.1, label drop 0.1, T = 1000 linear ε, AdamW lr 1e−4 with
    weight decay 0, batch 64, EMA 0.9999, DDIM over every timestep."""
    built: list[dict] = []

    def record(**kwargs):
        built.append(kwargs)
        return build_diffusion_unet(
            in_channels=kwargs["in_channels"],
            num_class_embeds=kwargs["num_class_embeds"],
            **cfg_unet_kwargs(),
        )

    monkeypatch.setattr(cfg_diffusion, "build_diffusion_unet", record)
    method = Shared()
    unet_settings = ("in_channels", "channels", "attention_levels", "num_res_blocks")
    unet_settings += ("num_head_channels", "norm_num_groups", "resblock_updown")
    expected = {key: SHARED_DEFAULTS[key] for key in unet_settings} | {"num_class_embeds": 3}
    assert built == [expected]  # the UNet's settings, and 2 classes + the null label
    assert method.hparams == SHARED_DEFAULTS
    assert {block.conv2[0].p for block in resnet_blocks(method.unet)} == {0.1}
    assert method.ema is not None and method.ema.decay == 0.9999
    scheduler = method.scheduler
    assert scheduler.num_train_timesteps == 1000 and scheduler.num_inference_steps == 1000
    assert scheduler.clip_sample and scheduler.prediction_type == "epsilon"
    np.testing.assert_allclose(
        scheduler.alphas_cumprod.numpy(), linear_alphas_cumprod(1000), rtol=1e-5
    )
    assert method.stride == 1
    optimizer = method.configure_optimizer(1e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert cfg_diffusion.ClassifierFreeDiffusion.default_learning_rate == 1e-4
    assert cfg_diffusion.ClassifierFreeDiffusion.default_batch_size == 64
    assert cfg_diffusion.ClassifierFreeDiffusion.supervision == "image_labels"


def test_every_hyperparameter_is_recorded_and_reaches_its_part():
    settings = {
        **SHARED_SETTINGS,
        "in_channels": 2,
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_inference_steps": 7,
        "score_seed": 5,
    }
    method = Shared(**settings)
    assert method.hparams == {
        **settings,
        "channels": (8, 16),
        "attention_levels": (False, True),
    }
    unet = method.unet
    assert unet.in_channels == 2 and unet.out_channels == 2
    assert unet.block_out_channels == (8, 16) and unet.num_res_blocks == (1, 1)
    assert next(m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)) == 4
    assert not any("downsample" in type(m).__name__.lower() for m in resnet_blocks(unet))
    assert unet.class_embedding.num_embeddings == 3
    assert unet.class_embedding.padding_idx == NULL
    assert unet.class_embedding.embedding_dim == 8 * 4  # MONAI's time embedding: 4 × channels[0]
    assert method.scheduler.num_train_timesteps == 100
    assert method.stride == 100 // 7
    assert method.ema.decay == 0.5
    optimizer = method.configure_optimizer(1e-3)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    unguided = Shared(**{**settings, "ema_decay": None})
    assert unguided.ema is None and unguided.hparams["ema_decay"] is None
    per_level = Shared(**{**settings, "num_head_channels": [4, 8], "resblock_updown": True})
    assert per_level.hparams["num_head_channels"] == (4, 8)
    assert per_level.hparams["resblock_updown"] is True


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"label_dropout": 1.0}, r"label_dropout=1.0, expected \[0, 1\)"),
        ({"label_dropout": -0.1}, r"label_dropout=-0.1, expected \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout=1.0, expected \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1, expected \[0, 1\)"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0, expected 1 … .*\(1000\)"),
        ({"num_inference_steps": 1001}, r"num_inference_steps=1001, expected 1 … .*\(1000\)"),
        (
            {"optimizer": "sgd"},
            r"hyperparameter optimizer='sgd', expected one of \['adam', 'adamw'\]",
        ),
    ],
)
def test_bad_hyperparameters_are_refused(settings, match):
    with pytest.raises(InputError, match=match):
        shared(**{**settings})


def test_hyperparameter_bounds_are_accepted():
    for settings in (
        {"label_dropout": 0.0, "dropout": 0.0},
        {"label_dropout": 0.99, "dropout": 0.99},
        {"num_inference_steps": 1},
        {"num_inference_steps": 1000},
    ):
        shared(**{**settings})


def test_null_label_row_is_the_padding_zero_row():
    method = shared()
    assert (HEALTHY, LESION, NULL) == (0, 1, 2)
    table = method.unet.class_embedding.weight
    assert torch.equal(table[NULL], torch.zeros_like(table[NULL]))
    assert table[HEALTHY].abs().sum() > 0 and table[LESION].abs().sum() > 0


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_training_loss_by_hand(label_dropout):
    """‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t, y')‖² with x0 = 2x − 1, t ~ U{0 … T − 1} and
    y' = ∅ where u < label_dropout (u ~ U[0, 1), one per slice, drawn first), else the slice
    label (any nonzero label a lesion: ∅ comes from the dropout only)."""
    method = stand_in(label_dropout=label_dropout, num_train_timesteps=50)
    b = 12
    g = torch.Generator().manual_seed(1)
    images = torch.rand(b, 2, 4, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.uint8)
    torch.manual_seed(7)
    loss = method.training_loss({"image": images, "label": labels})
    torch.manual_seed(7)
    u = torch.rand(b)
    t = torch.randint(0, 50, (b,))
    noise = torch.randn(b, 2, 4, 4).double().numpy()
    expected_labels = np.where(u.numpy() < label_dropout, NULL, np.minimum(labels.numpy(), 1))
    abar = linear_alphas_cumprod(50)[t.numpy()][:, None, None, None]
    x0 = images.double().numpy() * 2 - 1
    noisy = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    offsets = np.array(LABEL_OFFSET)[expected_labels][:, None, None, None]
    tt = t.numpy()[:, None, None, None]
    wave = 1 + np.cos(0.07 * tt + 4 * noisy.mean(axis=(2, 3), keepdims=True))
    eps = 0.2 * noisy + 8e-4 * tt + offsets * (1 + noisy**2) * wave
    (timesteps, called_labels, _shape) = method.unet.calls[0]
    assert timesteps == t.tolist() and called_labels == expected_labels.tolist()
    np.testing.assert_allclose(method.unet.inputs[0].numpy(), noisy, rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(((eps - noise) ** 2).mean(), rel=1e-5)
    if label_dropout:
        assert NULL in called_labels and 1 in called_labels  # both kinds drawn
    else:
        assert NULL not in called_labels


def test_training_timesteps_cover_zero_to_t_minus_one():
    method = stand_in(num_train_timesteps=4, num_inference_steps=4)
    torch.manual_seed(0)
    method.training_loss({"image": torch.rand(256, 2, 1, 1), "label": torch.zeros(256)})
    assert set(method.unet.calls[0][0]) == {0, 1, 2, 3}


def test_forward_and_scoring_networks():
    """``forward`` is the trained UNet; scoring uses the EMA copy when there is one."""
    method = shared(**{"ema_decay": 0.5})
    trained, averaged = StandInUNet(), StandInUNet()
    method.unet = trained
    method.ema.module = averaged
    x, t, y = torch.rand(2, 1, 4, 4), torch.tensor([3, 4]), torch.tensor([0, 2])
    method(x, t, y)
    assert trained.calls == [([3, 4], [0, 2], (2, 1, 4, 4))] and averaged.calls == []
    method.scoring_epsilon(x, t, y)
    assert averaged.calls == [([3, 4], [0, 2], (2, 1, 4, 4))] and len(trained.calls) == 1
    plain = stand_in()
    plain.scoring_epsilon(x, t, y)
    assert len(plain.unet.calls) == 1


def test_ema_follows_the_weights_after_each_step():
    """θ_ema ← d θ_ema + (1 − d) θ after every optimiser step, from the initial weights."""
    method = shared(**{"ema_decay": 0.75})
    initial = [p.detach().clone() for p in method.unet.parameters()]
    averaged = list(method.ema.module.parameters())
    assert all(torch.equal(a, p) for a, p in zip(averaged, initial, strict=True))
    with torch.no_grad():
        for p in method.unet.parameters():
            p.add_(1.0)
    method.after_optimizer_step()
    for averaged, start, current in zip(
        method.ema.module.parameters(), initial, method.unet.parameters(), strict=True
    ):
        torch.testing.assert_close(averaged, 0.75 * start + 0.25 * current)
    # Without EMA the step does nothing (and does not fail).
    stand_in().after_optimizer_step()


def test_predict_x0_by_hand():
    method = stand_in(num_train_timesteps=200)
    abar = linear_alphas_cumprod(200)
    g = torch.Generator().manual_seed(2)
    sample, eps = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    for t in (0, 37, 199):
        expected = x0_np(sample.double().numpy(), eps.double().numpy(), abar[t])
        assert (np.abs(expected) == 1).any() or t == 0  # the clip is exercised
        got = method.predict_x0(eps, t, sample)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_null_and_healthy_epsilon_is_one_call_null_first():
    method = stand_in()
    x = torch.rand(3, 2, 4, 4)
    eps_null, eps_healthy = method.null_and_healthy_epsilon(x, 17)
    assert method.unet.calls == [([17] * 6, [NULL] * 3 + [HEALTHY] * 3, (6, 2, 4, 4))]
    xn = x.double().numpy()
    np.testing.assert_allclose(eps_null.numpy(), epsilon_np(xn, 17, NULL), rtol=1e-5)
    np.testing.assert_allclose(eps_healthy.numpy(), epsilon_np(xn, 17, HEALTHY), rtol=1e-5)
    only_null = method.null_epsilon(x, 9)
    assert method.unet.calls[-1] == ([9] * 3, [NULL] * 3, (3, 2, 4, 4))
    np.testing.assert_allclose(only_null.numpy(), epsilon_np(xn, 9, NULL), rtol=1e-5)


@pytest.mark.parametrize(("n_inference", "n_steps", "w"), [(10, 3, 1.1), (5, 4, 0.0), (8, 2, 2.0)])
def test_ddim_encode_and_decode_against_float64(n_inference, n_steps, w):
    """Encoding t → t + s with ε(x_t, t, ∅), decoding t + s → t with the guided ε at t + s
    toward healthy, on the grid of stride s = T // n, both from and to timestep 0."""
    method = stand_in(num_train_timesteps=100, num_inference_steps=n_inference)
    stride = 100 // n_inference
    abar = linear_alphas_cumprod(100)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latent = method.ddim_encode(x, n_steps)
    expected_latent = ddim_encode_np(x.double().numpy(), n_steps, stride, abar)
    np.testing.assert_allclose(latent.numpy(), expected_latent, rtol=1e-4, atol=1e-5)
    assert [c[0] for c in method.unet.calls] == [[k * stride] * 3 for k in range(n_steps)]
    assert all(c[1] == [NULL] * 3 for c in method.unet.calls)
    method.unet.calls.clear()
    decoded = method.ddim_decode(latent, n_steps, w)
    expected = ddim_decode_np(expected_latent, n_steps, stride, abar, w)
    np.testing.assert_allclose(decoded.numpy(), expected, rtol=1e-4, atol=1e-5)
    steps = [k * stride for k in range(n_steps, 0, -1)]
    if w == 0:
        assert method.unet.calls == [([t] * 3, [HEALTHY] * 3, (3, 2, 4, 4)) for t in steps]
    else:
        assert method.unet.calls == [
            ([t] * 6, [NULL] * 3 + [HEALTHY] * 3, (6, 2, 4, 4)) for t in steps
        ]
