"""cDDPM (Behrendt et al., arXiv 2312.04215; FinnBehrendt/Conditioned-Diffusion-Models-UAD)
and its SparK pretraining (Tian et al., ICLR 2023) by their definitions, written out by hand:

- SparK (reference ``src/models/modules/spark/{Spark_2D,encoder,decoder}.py``): the mask
  keeps ``round(g² (1 − ratio))`` cells per slice, the first of a uniform random order
  (``idx = rand(B, f²).argsort()[:, :len_keep]``); cells of the encoder's total stride;
  every convolution and max-pool output multiplied by the mask at its resolution, BatchNorm
  as a ``BatchNorm1d`` over the visible positions only (``sp_bn_forward``); the loss is the
  squared error averaged per cell over pixels and channels, then over the masked cells
  (``pix_norm: False``, ``dense_loss: False``, ``loss_l2: True``); decoder initialisation
  (``LightDecoder.initialize``): convolutions truncated normal σ 0.02 with zero bias,
  transposed convolutions Kaiming normal (fan out, ReLU), BatchNorm 1 and 0; mask tokens
  truncated normal σ 0.02 in [−0.02, 0.02]; AdamW, weight decay 0.05, betas (0.9, 0.95)
  (``src/models/Spark_2D.py``).
- cDDPM (``src/models/DDPM_2D.py``, ``src/models/modules/cond_DDPM.py``,
  ``OpenAI_Unet.py``): the encoder reads the clean slice in [0, 1]; x0 = 2x − 1; t uniform
  in [0, T); x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (cosine schedule); the UNet predicts x0,
  L1 over all pixels; the condition passes Linear–SiLU–Linear and is concatenated *after*
  the time embedding (``th.cat([emb, label_emb(cond)], 1)``); scoring noises the slice to
  t ∈ {250, 500, 750} (index t − 1) with a fresh noise draw per t, averages the three
  reconstructions (x̂0 + 1) / 2 and maps |x − mean|.

Stand-in networks (plain functions) replace the UNet and the encoder where the arithmetic
around them is what is tested, so each test takes milliseconds.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import (
    DiffusionModelUNet,
    DiffusionUNetResnetBlock,
    get_timestep_embedding,
)
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.io.torchfile import save_torch
from brainuad.methods import build_method
from brainuad.methods.base import FINAL_STAGE
from brainuad.methods.cddpm import (
    SPARK_DEFAULTS,
    SPARK_STAGE,
    CDDPMNoSSL,
    EmbeddingSlot,
    SparKHead,
    build_encoder,
    concatenate_condition,
    encoder_pyramid,
    encoder_stride,
    expand_cells,
    masked_cell_loss,
    random_active_cells,
    sparse_batch_norm,
    sparse_mode,
    stage_channels,
)

TINY = {**TINY_HPARAMS["cddpm"], "noise": "gaussian"}


class Function(torch.nn.Module):
    """A plain function standing in for a submodule; records its calls."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function
        self.calls: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append(
            ([copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}, self.training)
        )
        return self.function(*args, **kwargs)


def copy(value):
    """A detached copy of a tensor, or of each tensor of a list."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return [copy(v) for v in value]


def fake_encoder(images: torch.Tensor) -> torch.Tensor:
    """A condition [B, 2] that depends on each slice: its mean and its maximum."""
    return torch.stack([images.mean(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3))], dim=1)


def fake_x0(noisy, timesteps, class_labels):
    """x̂0 from x_t, t and the condition; every input matters."""
    c = class_labels.to(noisy.dtype)
    shift = 0.3 * c[:, 0] - 0.2 * c[:, 1] + 0.001 * timesteps.to(noisy.dtype)
    return 0.5 * noisy - 0.25 + shift.view(-1, 1, 1, 1)


def fake_x0_numpy(noisy: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
    shift = 0.3 * c[:, 0] - 0.2 * c[:, 1] + 0.001 * t
    return 0.5 * noisy - 0.25 + shift.reshape(-1, 1, 1, 1)


def cosine_alpha_bar(steps: int, s: float = 0.008) -> np.ndarray:
    """ᾱ at indices 0 … T − 1 of the cosine schedule (Nichol & Dhariwal), float64."""

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(t) / f(t - 1), 0.999) for t in range(1, steps + 1)]
    return np.cumprod(1 - np.array(betas))


def stand_in(**overrides):
    """The tiny cDDPM with stand-ins for the UNet and the encoder, and its noise draws
    recorded in ``noise_timesteps`` (t-dependent noise, e.g. ``simplex_3d``, reads them)."""
    torch.manual_seed(0)
    method = build_method("cddpm", **{**TINY, **overrides})
    method.unet = Function(fake_x0)
    method.encoder = Function(fake_encoder)
    draw, method.noise_timesteps = method.noise, []

    def recording_noise(shape, timesteps=None, **kwargs):
        method.noise_timesteps.append(None if timesteps is None else timesteps.tolist())
        return draw(shape, timesteps, **kwargs)

    method.noise = recording_noise
    return method


def images_and_mask(b=2, c=1, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(b, c, size, size, generator=generator)
    mask = (torch.rand(b, 1, size, size, generator=generator) > 0.3).float()
    return images, mask


# -- SparK: the mask -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "ratio", "keep"),
    [((3, 3), 0.65, 3), ((4, 4), 0.65, 6), ((2, 2), 0.65, 1), ((2, 3), 0.5, 3), ((4, 4), 0.3, 11)],
)
def test_mask_keeps_the_rounded_share_of_cells_per_slice(grid, ratio, keep):
    active = random_active_cells(5, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert active.shape == (5, 1, *grid) and active.dtype == torch.bool
    assert active.flatten(1).sum(1).tolist() == [keep] * 5


def test_mask_is_the_first_cells_of_a_uniform_random_order():
    """SparK's ``mask``: ``idx = rand(B, f²).argsort()[:, :len_keep]``, row-major cells."""
    b, (gh, gw), keep = 4, (2, 3), 2  # ratio 0.6: round(6 × 0.4) = 2
    drawn = torch.rand(b, gh * gw, generator=torch.Generator().manual_seed(7))
    expected = np.zeros((b, gh * gw), dtype=bool)
    for i in range(b):
        expected[i, np.argsort(drawn[i].numpy(), kind="stable")[:keep]] = True
    active = random_active_cells(b, (gh, gw), 0.6, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(active.numpy(), expected.reshape(b, 1, gh, gw))
    # Without a generator: the global RNG, so a seeded run repeats its masks.
    torch.manual_seed(3)
    first = random_active_cells(b, (gh, gw), 0.6)
    torch.manual_seed(3)
    assert torch.equal(first, random_active_cells(b, (gh, gw), 0.6))
    # Uniform over cells: each is visible in about keep / cells of the slices.
    many = random_active_cells(3000, (2, 3), 0.6, generator=torch.Generator().manual_seed(0))
    frequency = many.float().mean(dim=0).flatten()
    assert torch.allclose(frequency, torch.full((6,), 2 / 6), atol=0.04)


@pytest.mark.parametrize(("grid", "ratio", "keep"), [((2, 2), 0.9, 0), ((2, 2), 0.1, 4)])
def test_mask_without_a_visible_or_masked_cell_is_refused(grid, ratio, keep):
    message = (
        f"SparK: a 2 × 2 grid with mask ratio {ratio} keeps {keep} of 4 cells visible; at "
        "least one must be visible and one masked (use a larger slice or encoder_max_pool: "
        "false for 16-px cells)"
    )
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        random_active_cells(2, grid, ratio)


def test_expand_cells_repeats_each_cell_over_its_pixels():
    active = torch.tensor([[[[True, False, True], [False, False, True]]]])  # [1, 1, 2, 3]
    like = torch.zeros(1, 4, 4, 6)
    expanded = expand_cells(active, like)
    expected = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    for i in range(4):
        for j in range(6):
            expected[0, 0, i, j] = active[0, 0, i // 2, j // 2]
    assert torch.equal(expanded, expected)
    assert torch.equal(expand_cells(active, torch.zeros(1, 1, 2, 3)), active)
    with pytest.raises(RuntimeError, match="5 × 6 is not a multiple of the mask grid 2 × 3"):
        expand_cells(active, torch.zeros(1, 1, 5, 6))
    with pytest.raises(RuntimeError, match="4 × 7 is not a multiple"):
        expand_cells(active, torch.zeros(1, 1, 4, 7))


# -- SparK: the loss -----------------------------------------------------------------------


def masked_cell_loss_numpy(reconstruction, target, active) -> float:
    """Squared error averaged over each cell's pixels and channels, then over masked cells."""
    b, _, h, w = target.shape
    gh, gw = active.shape[-2:]
    ch, cw = h // gh, w // gw
    total, count = 0.0, 0
    for n in range(b):
        for i in range(gh):
            for j in range(gw):
                if active[n, 0, i, j]:
                    continue
                cell = np.s_[n, :, i * ch : (i + 1) * ch, j * cw : (j + 1) * cw]
                total += ((reconstruction[cell] - target[cell]) ** 2).mean()
                count += 1
    return total / count


def test_masked_cell_loss_by_hand():
    generator = torch.Generator().manual_seed(0)
    reconstruction = torch.randn(2, 2, 8, 12, generator=generator)
    target = torch.rand(2, 2, 8, 12, generator=generator, dtype=torch.float64)
    active = torch.tensor([[[[True, False, False], [False, True, False]]]] * 2)
    active[1, 0, 1, 2] = True  # different masks per slice: 4 and 3 masked cells
    loss = masked_cell_loss(reconstruction, target, active)
    expected = masked_cell_loss_numpy(
        reconstruction.double().numpy(), target.numpy(), active.numpy()
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # No per-patch normalisation of the target (pix_norm False): a constant shift of a masked
    # cell's target raises the loss by the shift squared over the masked-cell count.
    shifted = target.clone()
    shifted[0, :, 0:4, 4:8] += 0.5  # slice 0, cell (0, 1): masked
    increase = masked_cell_loss(reconstruction, shifted, active).item() - loss.item()
    before = ((reconstruction[0, :, 0:4, 4:8].double() - target[0, :, 0:4, 4:8]) ** 2).mean()
    after = ((reconstruction[0, :, 0:4, 4:8].double() - shifted[0, :, 0:4, 4:8]) ** 2).mean()
    assert increase == pytest.approx((after - before).item() / 7, rel=1e-5)


# -- SparK: the sparse network -------------------------------------------------------------


def visible_rows(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)[active[:, 0]]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sparse_batch_norm_is_a_batch_norm_1d_over_visible_positions(momentum):
    """The reference's ``SparseBatchNorm2d`` is a ``BatchNorm1d`` applied to the features at
    visible positions ([N, C]); masked positions come out 0. Training then evaluation."""
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.BatchNorm2d(3, momentum=momentum, eps=0.5)  # the norm's own ε
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    oracle = torch.nn.BatchNorm1d(3, momentum=momentum, eps=0.5)
    oracle.load_state_dict(norm.state_dict())
    active = torch.rand(2, 1, 4, 6, generator=generator) > 0.5
    for step in range(2):
        x = 3 * torch.randn(2, 3, 4, 6, generator=generator) + step
        out = sparse_batch_norm(norm, x, active)
        expected = oracle(visible_rows(x, active))
        torch.testing.assert_close(visible_rows(out, active), expected)
        assert (out.permute(0, 2, 3, 1)[~active[:, 0]] == 0).all()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(norm, name), getattr(oracle, name))
    assert norm.num_batches_tracked.item() == 2
    norm.eval()
    oracle.eval()
    x = torch.randn(2, 3, 4, 6, generator=generator)
    out = sparse_batch_norm(norm, x, active)
    torch.testing.assert_close(visible_rows(out, active), oracle(visible_rows(x, active)))
    assert norm.num_batches_tracked.item() == 2  # evaluation leaves the statistics alone
    torch.testing.assert_close(norm.running_mean, oracle.running_mean)


def test_sparse_batch_norm_without_running_statistics():
    generator = torch.Generator().manual_seed(1)
    norm = torch.nn.BatchNorm2d(2, track_running_stats=False, affine=False)
    active = torch.rand(3, 1, 4, 4, generator=generator) > 0.4
    x = torch.randn(3, 2, 4, 4, generator=generator)
    rows = visible_rows(x, active)
    expected = (rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + norm.eps)
    for mode in (True, False):  # batch statistics in training and in evaluation
        norm.train(mode)
        out = sparse_batch_norm(norm, x, active)
        torch.testing.assert_close(visible_rows(out, active), expected)


def test_sparse_mode_masks_every_convolution_and_pool_and_restores_the_network():
    """On a small network of every kind of layer the encoder has: conv → BN → ReLU → max
    pool → conv, run in sparse mode, against the same chain written out with a mask after
    each conv and pool and the 1D batch norm over visible positions."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, stride=2, padding=1),
        torch.nn.Conv2d(4, 3, 3, padding=1, bias=True),
        torch.nn.BatchNorm2d(3),
    )
    with torch.no_grad():
        network[1].bias.fill_(0.5)  # so that masked positions would not stay 0 by chance
        network[4].bias.fill_(0.3)
    images = torch.rand(2, 1, 16, 16)
    active = torch.tensor([[[[True, False], [False, False]]], [[[False, True], [True, False]]]])

    def mask(x):
        return x * expand_cells(active, x)

    def bn(norm, x):
        where = expand_cells(active, x)
        out = torch.zeros_like(x.permute(0, 2, 3, 1))
        out[where[:, 0]] = F.batch_norm(
            visible_rows(x, where), None, None, norm.weight, norm.bias, True, 0.0, norm.eps
        )
        return out.permute(0, 3, 1, 2)

    with torch.no_grad():
        x = mask(network[0](images))
        x = mask(network[3](torch.relu(bn(network[1], x))))
        expected = bn(network[5], mask(network[4](x)))
        dense = network(images)
        with sparse_mode(network, active):
            sparse = network(images)
        restored = network(images)
    torch.testing.assert_close(sparse, expected)
    assert (sparse * ~expand_cells(active, sparse)).abs().max() == 0
    assert torch.equal(restored, dense)
    assert all(not m._forward_hooks for m in network.modules())
    assert all("forward" not in vars(m) for m in network.modules())
    # Restored after an error inside the block too.
    with pytest.raises(ValueError, match="inside"), sparse_mode(network, active):
        raise ValueError("inside")
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in network.modules())


# -- the encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "widen", "max_pool", "channels", "stride"),
    [
        ("resnet10", 0.125, False, [8, 16, 32, 64], 16),
        ("resnet18", 0.125, True, [8, 16, 32, 64], 32),
        ("resnet50", 1 / 16, True, [16, 32, 64, 128], 32),  # bottleneck: 4 × the inner width
    ],
)
def test_encoder_layout_stride_and_pyramid(kind, widen, max_pool, channels, stride):
    """timm's ResNet layout: 7 × 7 stride-2 stem, max pool (or none), no shortcut bias; the
    four stage outputs at strides s/8 … s; the pyramid is the dense network's own path."""
    torch.manual_seed(0)
    encoder = build_encoder(
        kind, in_channels=2, out_features=6, widen_factor=widen, max_pool=max_pool
    ).eval()
    assert encoder.conv1.in_channels == 2 and encoder.conv1.kernel_size == (7, 7)
    assert encoder.conv1.stride == (2, 2) and encoder.fc.out_features == 6
    assert encoder.no_max_pool is not max_pool
    assert encoder.layer2[0].downsample[0].bias is None
    assert encoder_stride(encoder) == stride
    assert stage_channels(encoder) == channels
    images = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        pyramid = encoder_pyramid(encoder, images)
        dense = encoder(images)
    assert [tuple(f.shape) for f in pyramid] == [
        (2, c, 64 * 8 // stride // 2**k, 64 * 8 // stride // 2**k) for k, c in enumerate(channels)
    ]
    pooled = encoder.fc(torch.flatten(encoder.avgpool(pyramid[-1]), 1))
    torch.testing.assert_close(pooled, dense)


# -- the SparK head ------------------------------------------------------------------------


def test_spark_head_layout_and_decoder_initialisation():
    torch.manual_seed(0)
    head = SparKHead(feature_channels=[8, 16, 32, 64], stride=16, width=64, out_channels=2)
    assert [n.num_features for n in head.norms] == [64, 32, 16, 8]  # deepest first
    assert [tuple(t.shape) for t in head.mask_tokens] == [(1, c, 1, 1) for c in (64, 32, 16, 8)]
    for token in head.mask_tokens:
        assert token.abs().max() <= 0.02 and token.std() > 0.005
    # Links: 1 × 1 at the deepest level (the identity when the widths agree), 3 × 3 with
    # bias elsewhere, into width / 2^i.
    assert isinstance(head.links[0], torch.nn.Identity)
    for i, (link, c) in enumerate(zip(head.links[1:], (32, 16, 8), strict=True), start=1):
        assert (link.in_channels, link.out_channels) == (c, 64 // 2**i)
        assert link.kernel_size == (3, 3) and link.padding == (1, 1) and link.bias is not None
    linked = SparKHead(feature_channels=[8, 16, 32, 48], stride=16, width=64, out_channels=1)
    deepest = linked.links[0]
    assert (deepest.in_channels, deepest.out_channels, deepest.kernel_size) == (48, 64, (1, 1))
    assert deepest.padding == (0, 0)
    # Decoder: log2(stride) levels, widths 64 → 4, each a 4 × 4 stride-2 transposed conv
    # and two 3 × 3 conv + BN (ReLU6 between), then a 1 × 1 conv to the image's channels.
    widths = [64, 32, 16, 8, 4]
    assert len(head.decoder) == 4
    for level, c_in, c_out in zip(head.decoder, widths[:-1], widths[1:], strict=True):
        up, conv1, bn1, act, conv2, bn2 = level
        assert (up.in_channels, up.out_channels, up.kernel_size) == (c_in, c_in, (4, 4))
        assert up.stride == (2, 2) and up.padding == (1, 1) and up.bias is not None
        assert (conv1.in_channels, conv1.out_channels, conv2.out_channels) == (c_in, c_in, c_out)
        for conv in (conv1, conv2):
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
        assert (bn1.num_features, bn2.num_features) == (c_in, c_out)
        assert isinstance(act, torch.nn.ReLU6)
    assert (head.out.in_channels, head.out.out_channels, head.out.kernel_size) == (4, 2, (1, 1))
    # Initialisation (LightDecoder.initialize): conv σ 0.02, transposed conv Kaiming normal
    # with fan out (σ = sqrt(2 / (c · 16))), BN weight 1 and bias 0, all biases 0.
    first = head.decoder[0]
    assert first[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert first[0].weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 16)), rel=0.05)
    assert first[0].weight.mean().abs() < 2e-3
    assert head.out.weight.abs().max() < 0.1
    for module in head.decoder.modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, torch.nn.BatchNorm2d):
            assert (module.weight == 1).all() and (module.bias == 0).all()
    assert (head.out.bias == 0).all()


@pytest.mark.parametrize("stride", [16, 32])
def test_spark_head_forward_by_hand(stride):
    """Deepest first: sparse BN, mask tokens at masked positions, link, then x = 0; per
    level x = level(x + link_i) (at stride 32 the fifth level gets no link); output the
    1 × 1 projection. Features at masked positions are never read."""
    torch.manual_seed(0)
    head = SparKHead(feature_channels=[4, 6, 8, 12], stride=stride, width=32, out_channels=1)
    with torch.no_grad():
        for token in head.mask_tokens:
            token.normal_()
    active = torch.tensor([[[[True, False], [False, True]]], [[[False, False], [True, False]]]])
    features = [torch.randn(2, c, 16 // 2**k, 16 // 2**k) for k, c in enumerate([4, 6, 8, 12])]
    out = head(features, active)
    assert out.shape == (2, 1, 2 * stride, 2 * stride)  # 2 × 2 cells

    to_decoder = []
    for i, feature in enumerate(features[::-1]):
        where = expand_cells(active, feature)
        norm = head.norms[i]
        normalised = torch.zeros_like(feature.permute(0, 2, 3, 1))
        normalised[where[:, 0]] = F.batch_norm(
            visible_rows(feature, where), None, None, norm.weight, norm.bias, True, 0.0, norm.eps
        )
        filled = torch.where(where, normalised.permute(0, 3, 1, 2), head.mask_tokens[i])
        to_decoder.append(head.links[i](filled))
    links = to_decoder + [0] * (len(head.decoder) - 4)
    assert len(links) == round(math.log2(stride))
    x = 0
    for level, link in zip(head.decoder, links, strict=True):
        x = level(x + link)
    torch.testing.assert_close(out, head.out(x))

    junk = [torch.where(expand_cells(active, f), f, torch.full_like(f, 1e3)) for f in features]
    torch.testing.assert_close(head(junk, active), out)


@pytest.mark.parametrize(("stride", "width"), [(16, 24), (24, 48), (32, 16)])
def test_spark_head_refuses_widths_off_the_stride(stride, width):
    with pytest.raises(InputError, match=rf"decoder_width={width} .* stride {stride}"):
        SparKHead(feature_channels=[4, 8, 16, 32], stride=stride, width=width, out_channels=1)


# -- the condition -------------------------------------------------------------------------


def test_embedding_slot_writes_its_slot_of_a_zero_vector():
    inner = Function(lambda x: x * 2)
    x = torch.arange(6.0).view(2, 3)
    zero = torch.zeros(2, 3)
    assert torch.equal(EmbeddingSlot(inner, width=3, slot=0)(x), torch.cat([2 * x, zero], 1))
    assert torch.equal(EmbeddingSlot(inner, width=3, slot=1)(x), torch.cat([zero, 2 * x], 1))
    three = EmbeddingSlot(inner, width=3, slot=1, slots=3)(x)
    assert torch.equal(three, torch.cat([zero, 2 * x, zero], 1))


def test_every_residual_block_reads_silu_of_time_then_condition():
    """Each block projects SiLU([e_t; MLP(c)]) (``OpenAI_Unet.py``: ``th.cat([emb,
    label_emb(cond)], 1)``), with e_t MONAI's time MLP of the sinusoidal embedding and MLP
    Linear(D, E)–SiLU–Linear(E, E)."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        attention_levels=(False, False),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
    )
    concatenate_condition(unet, 5)
    mlp = unet.class_embedding.inner
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (5, 32, 32)
    blocks = [m for m in unet.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    assert blocks and all(b.time_emb_proj.in_features == 64 for b in blocks)
    assert [b.time_emb_proj.out_features for b in blocks] == [
        b.conv2.conv.out_channels for b in blocks
    ]
    seen = []
    for block in blocks:
        block.time_emb_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    t, condition = torch.tensor([3, 700]), torch.randn(2, 5)
    with torch.no_grad():
        unet(torch.randn(2, 1, 16, 16), t, class_labels=condition)
        time = unet.time_embed.inner(get_timestep_embedding(t, 8))
        expected = F.silu(torch.cat([time, mlp(condition)], dim=1))
    assert len(seen) == len(blocks)
    for embedding in seen:
        torch.testing.assert_close(embedding, expected)


# -- the cDDPM objective and scoring -------------------------------------------------------


@pytest.mark.parametrize(("loss", "region"), [("l1", "image"), ("l2", "brain")])
def test_training_loss_by_hand(loss, region):
    method = stand_in(loss=loss, loss_region=region)
    images, brainmask = images_and_mask(b=3, c=2)
    torch.manual_seed(11)
    value = method.training_loss({"image": images, "brainmask": brainmask})
    torch.manual_seed(11)
    t = torch.randint(0, 1000, (3,))
    eps = torch.randn(3, 2, 16, 16).double().numpy()

    x = images.double().numpy()
    c = fake_encoder(images).double().numpy()  # from the clean slice in [0, 1]
    x0 = 2 * x - 1
    abar = cosine_alpha_bar(1000)[t.numpy()].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    error = fake_x0_numpy(noisy, t.numpy(), c) - x0
    error = np.abs(error) if loss == "l1" else error**2
    if region == "image":
        expected = error.mean()
    else:
        weight = np.broadcast_to(brainmask.double().numpy(), error.shape)
        expected = (error * weight).sum() / weight.sum()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    (encoded,), _, _ = method.encoder.calls[0]
    assert torch.equal(encoded, images)
    (seen_noisy, seen_t), kwargs, _ = method.unet.calls[0]
    assert torch.equal(seen_t, t) and method.noise_timesteps == [t.tolist()]
    np.testing.assert_allclose(seen_noisy.numpy(), noisy, atol=1e-5)
    torch.testing.assert_close(kwargs["class_labels"], fake_encoder(images))


def test_training_timesteps_cover_zero_to_t_minus_one():
    method = stand_in(num_train_timesteps=5, test_timesteps=[1, 5])
    images, mask = images_and_mask(b=64, size=8)
    torch.manual_seed(0)
    method.training_loss({"image": images, "brainmask": mask})
    (_, t), _, _ = method.unet.calls[0]
    assert sorted(set(t.tolist())) == [0, 1, 2, 3, 4]


def score_by_hand(images, steps, seed, abar, per_slice=False):
    """The reference's ensemble in float64: for each t (1-based), noise to index t − 1 with
    a fresh draw, x̂0 in one step, (x̂0 + 1) / 2; the reconstructions averaged."""
    generator = torch.Generator().manual_seed(seed)
    groups = [images[i : i + 1] for i in range(len(images))] if per_slice else [images]
    reconstructions = []
    for group in groups:
        x = group.double().numpy()
        c = fake_encoder(group).double().numpy()
        total = 0.0
        for step in steps:
            eps = torch.randn(group.shape, generator=generator).double().numpy()
            a = abar[step - 1]
            noisy = np.sqrt(a) * (2 * x - 1) + np.sqrt(1 - a) * eps
            t = np.full(len(group), step - 1)
            total = total + (fake_x0_numpy(noisy, t, c) + 1) / 2
        reconstructions.append(total / len(steps))
    reconstruction = np.concatenate(reconstructions)
    return np.abs(images.double().numpy() - reconstruction).mean(axis=1), reconstruction


@pytest.mark.parametrize(
    ("settings", "steps"),
    [
        ({}, (250, 500, 750)),
        ({"test_timesteps": [1, 1000], "score_seed": 4}, (1, 1000)),
        ({"test_timesteps": [20, 7], "num_train_timesteps": 20}, (20, 7)),
        ({"test_timesteps": [5]}, (5,)),  # one noise level (config/tiny.yaml)
    ],
)
def test_scoring_by_hand(settings, steps):
    method = stand_in(**settings)
    method.train()
    images, brainmask = images_and_mask(b=2, c=2)
    out = method.score(images, brainmask)
    seed = settings.get("score_seed", 0)
    abar = cosine_alpha_bar(settings.get("num_train_timesteps", 1000))
    anomaly_map, reconstruction = score_by_hand(images, steps, seed, abar)
    np.testing.assert_allclose(out.reconstruction.numpy(), reconstruction, atol=2e-6)
    np.testing.assert_allclose(out.anomaly_map.numpy(), anomaly_map, atol=2e-6)
    assert method.training  # scoring runs in eval mode and restores the mode
    assert len(method.encoder.calls) == 1 and method.encoder.calls[0][2] is False
    assert torch.equal(method.encoder.calls[0][0][0], images)  # the clean slice
    (_, t), kwargs, training = method.unet.calls[0]
    assert t.tolist() == [s - 1 for s in steps for _ in range(2)] and not training
    assert method.noise_timesteps == [[s - 1] * 2 for s in steps]  # a draw per level, for it
    assert torch.equal(kwargs["class_labels"], fake_encoder(images).repeat(len(steps), 1))

    looped = method.unbatched_score(images, brainmask)
    anomaly_map, reconstruction = score_by_hand(images, steps, seed, abar, per_slice=True)
    np.testing.assert_allclose(looped.reconstruction.numpy(), reconstruction, atol=2e-6)
    np.testing.assert_allclose(looped.anomaly_map.numpy(), anomaly_map, atol=2e-6)
    assert method.training and not any(training for _, _, training in method.unet.calls)
    single = method.score(images[:1], brainmask[:1])
    torch.testing.assert_close(
        method.unbatched_score(images[:1], brainmask[:1]).anomaly_map, single.anomaly_map
    )


def test_unbatched_score_keeps_evaluation_mode():
    method = stand_in().eval()
    images, brainmask = images_and_mask(b=1)
    method.unbatched_score(images, brainmask)
    assert not method.training


# -- stages --------------------------------------------------------------------------------


def test_spark_loss_masks_the_input_and_scores_masked_cells_against_the_clean_slice():
    torch.manual_seed(0)
    method = build_method(
        "cddpm", **{**TINY, "spark_settings": {"decoder_width": 16, "mask_ratio": 0.5}}
    )
    images = torch.rand(2, 1, 64, 64)
    generator = torch.Generator().manual_seed(5)
    reconstruction = torch.rand(2, 1, 64, 64, generator=generator)
    method.spark_head = Function(lambda features, active: reconstruction)
    encoder_inputs = []
    method.encoder.conv1.register_forward_pre_hook(lambda m, a: encoder_inputs.append(a[0]))
    torch.manual_seed(9)
    loss = method.stage_loss(SPARK_STAGE, {"image": images, "brainmask": torch.ones_like(images)})
    torch.manual_seed(9)
    active = random_active_cells(2, (4, 4), 0.5)  # 16-px cells of the stride-16 encoder
    (features, seen_active), _, _ = method.spark_head.calls[0]
    assert torch.equal(seen_active, active) and (active.flatten(1).sum(1) == 8).all()
    assert torch.equal(encoder_inputs[0], images * expand_cells(active, images))
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    for feature in features:
        assert (feature * ~expand_cells(active, feature)).abs().max() == 0
    expected = masked_cell_loss_numpy(reconstruction.numpy(), images.numpy(), active.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert all("forward" not in vars(m) for m in method.encoder.modules())


@pytest.mark.parametrize("size", [(40, 32), (32, 40)])
def test_spark_loss_refuses_slices_off_the_cell_grid(size):
    method = build_method("cddpm", **TINY)
    with pytest.raises(InputError, match=rf"stride 16, got {size[0]} × {size[1]}"):
        method.spark_loss(torch.rand(1, 1, *size))


def test_stage_losses_and_optimisers():
    settings = {
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "spark_settings": {"decoder_width": 16, "weight_decay": 0.2, "betas": [0.5, 0.6]},
    }
    method = stand_in(**settings)
    images, mask = images_and_mask(b=2, size=16)
    batch = {"image": images, "brainmask": mask}
    torch.manual_seed(1)
    model_loss = method.stage_loss(FINAL_STAGE, batch)
    torch.manual_seed(1)
    assert torch.equal(model_loss, method.training_loss(batch))
    with pytest.raises(InputError, match="no loss for stage 'other'"):
        method.stage_loss("other", batch)
    with pytest.raises(InputError, match="has no stage 'other'"):
        method.configure_optimizer(1e-4, "other")

    method = build_method("cddpm", **{**TINY, **settings})
    spark = method.configure_optimizer(3e-3, SPARK_STAGE)
    assert type(spark) is torch.optim.AdamW
    assert spark.defaults["lr"] == 3e-3 and spark.defaults["weight_decay"] == 0.2
    assert spark.defaults["betas"] == (0.5, 0.6)
    encoder = [id(p) for p in method.encoder.parameters()]
    head = [id(p) for p in method.spark_head.parameters()]
    assert [id(p) for p in spark.param_groups[0]["params"]] == encoder + head
    model = method.configure_optimizer(2e-3)
    assert type(model) is torch.optim.AdamW and model.defaults["weight_decay"] == 0.01
    assert model.defaults["lr"] == 2e-3 and model.defaults["betas"] == (0.9, 0.999)
    unet = [id(p) for p in method.unet.parameters()]
    assert [id(p) for p in model.param_groups[0]["params"]] == encoder + unet

    nossl = build_method("cddpm_nossl", **{**TINY_HPARAMS["cddpm_nossl"], "noise": "gaussian"})
    with pytest.raises(InputError, match="no loss for stage 'spark'"):
        nossl.stage_loss(SPARK_STAGE, batch)


def test_load_stage_takes_the_encoder_without_fc_and_refuses_other_files(tmp_path):
    torch.manual_seed(1)
    source = build_method("cddpm", **TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    source.save(tmp_path / "spark.pt")
    torch.manual_seed(2)
    target = build_method("cddpm", **TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    target.load_stage(SPARK_STAGE, tmp_path / "spark.pt")
    for key, value in target.state_dict().items():
        takes = key.startswith("encoder.") and not key.startswith("encoder.fc.")
        assert torch.equal(value, source.state_dict()[key] if takes else before[key]), key

    # The final stage's own file loads encoder and UNet (the base class's rule).
    target.load_stage(FINAL_STAGE, tmp_path / "spark.pt")
    assert torch.equal(target.unet.conv_in.conv.weight, source.unet.conv_in.conv.weight)

    deeper = build_method("cddpm", **{**TINY, "encoder": "resnet18"})
    deeper.save(tmp_path / "resnet18.pt")
    with pytest.raises(
        InputError, match=r"resnet18.pt: weights do not match this encoder .*layer1\.1"
    ):
        target.load_stage(SPARK_STAGE, tmp_path / "resnet18.pt")
    wider = build_method("cddpm", **{**TINY, "encoder_widen_factor": 0.25})
    wider.save(tmp_path / "wider.pt")
    with pytest.raises(
        InputError,
        match=r"wider\.pt: weights do not match this encoder .*other shapes \['bn1.bias'",
    ):
        target.load_stage(SPARK_STAGE, tmp_path / "wider.pt")
    payload = torch.load(tmp_path / "spark.pt", weights_only=True)
    del payload["state_dict"]["encoder.bn1.weight"]
    save_torch(payload, tmp_path / "partial.pt")
    with pytest.raises(InputError, match=r"missing \['bn1.weight'"):
        target.load_stage(SPARK_STAGE, tmp_path / "partial.pt")
    nossl = build_method("cddpm_nossl", **TINY_HPARAMS["cddpm_nossl"])
    nossl.save(tmp_path / "nossl.pt")
    with pytest.raises(InputError, match="method 'cddpm_nossl', expected 'cddpm'"):
        target.load_stage(SPARK_STAGE, tmp_path / "nossl.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a brainuad model file"):
        target.load_stage(SPARK_STAGE, tmp_path / "other.pt")


# -- hyperparameters -----------------------------------------------------------------------


def test_paper_defaults_and_their_parts():
    """``DDPM_cond_spark_2D.yaml`` (UNet 128 × [1, 2, 2], 3 blocks, noise ensemble 250 /
    500 / 750, simplex noise, pred_x0, L1), ``DDPM_2D.py`` (``cond_dim = unet_dim × 4``),
    ``Spark_2D.yaml`` / ``Spark_2D_pretrain.yaml`` (ResNet-50, mask ratio 0.65, decoder 512)
    and ``Spark_2D.py`` (AdamW 0.05, (0.9, 0.95))."""
    torch.manual_seed(0)
    method = build_method("cddpm")
    assert method.hparams == {
        "in_channels": 1,
        "channels": (128, 256, 256),
        "attention_levels": (False, False, False),
        "num_res_blocks": 3,
        "num_head_channels": 64,
        "norm_num_groups": 32,
        "resblock_updown": True,
        "num_train_timesteps": 1000,
        "schedule": "cosine",
        "test_timesteps": (250, 500, 750),
        "noise": "simplex",
        "noise_settings": {},
        "loss": "l1",
        "loss_region": "image",
        "score_seed": 0,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "encoder": "resnet50",
        "encoder_widen_factor": 1.0,
        "encoder_max_pool": True,
        "condition_dim": 512,
        "spark_settings": {},
    }
    assert SPARK_DEFAULTS == {
        "mask_ratio": 0.65,
        "decoder_width": 512,
        "weight_decay": 0.05,
        "betas": (0.9, 0.95),
    }
    assert method.spark == SPARK_DEFAULTS
    assert method.scoring_hparams == {"test_timesteps", "score_seed"}
    assert (method.default_learning_rate, method.default_batch_size) == (1e-4, 32)
    encoder = method.encoder
    assert stage_channels(encoder) == [256, 512, 1024, 2048] and encoder_stride(encoder) == 32
    assert encoder.fc.out_features == 512 and encoder.conv1.in_channels == 1
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(24.55e6, rel=1e-3)
    mlp = method.unet.class_embedding.inner
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (512, 512, 512)
    head = method.spark_head
    assert [level[0].in_channels for level in head.decoder] == [512, 256, 128, 64, 32]
    assert head.out.in_channels == 16 and head.links[0].in_channels == 2048
    # Mask tokens: N(0, 0.02²) truncated to ±0.02 (±1σ), whose standard deviation is
    # 0.02 · sqrt(1 − 2φ(1) / (2Φ(1) − 1)) = 0.01079 (3840 values: ±8e-5).
    tokens = torch.cat([t.detach().flatten() for t in head.mask_tokens])
    assert tokens.numel() == 3840 and tokens.abs().max() <= 0.02
    assert tokens.std().item() == pytest.approx(0.01079, abs=3e-4)
    assert [s.name for s in method.stages] == [SPARK_STAGE, FINAL_STAGE]
    assert method.stage(FINAL_STAGE).consumes == (SPARK_STAGE,)
    assert method.stage(SPARK_STAGE).modules == ("encoder", "spark_head")
    assert method.stage(FINAL_STAGE).modules == ("encoder", "unet")


def test_settings_are_recorded_and_reach_their_parts():
    settings = {
        "in_channels": 2,
        "channels": (8, 16),
        "attention_levels": (False, True),
        "num_res_blocks": 2,
        "num_head_channels": 4,
        "norm_num_groups": 4,
        "resblock_updown": False,
        "num_train_timesteps": 400,
        "schedule": "linear_beta",
        "noise_settings": {"octaves": 2, "frequency": 8.0},
        "loss": "l2",
        "loss_region": "brain",
        "optimizer": "adamw",
        "weight_decay": 0.1,
        "test_timesteps": ["300", 10],
        "encoder": "resnet18",
        "encoder_widen_factor": 0.25,
        "encoder_max_pool": True,
        "condition_dim": 6,
        "spark_settings": {"mask_ratio": 0.5, "decoder_width": 32},
        "score_seed": 3,
        "noise": "simplex",
    }
    method = build_method("cddpm", **{**TINY, **settings})
    expected = {**settings, "test_timesteps": (300, 10)}
    for key, value in expected.items():
        assert method.hparams[key] == value, key
    assert "test_timestep" not in method.hparams
    unet, scheduler = method.unet, method.scheduler
    assert unet.block_out_channels == (8, 16) and unet.num_res_blocks == (2, 2)
    assert unet.in_channels == 2 and not isinstance(
        unet.down_blocks[0].downsampler, DiffusionUNetResnetBlock
    )
    assert scheduler.num_train_timesteps == 400
    assert scheduler.betas[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert (scheduler.betas[1] - scheduler.betas[0]).item() == pytest.approx(
        (0.02 - 1e-4) / 399, rel=1e-4
    )  # linear β from 1e-4 to 0.02
    assert method.noise.settings() == {
        "kind": "simplex",
        "octaves": 2,
        "persistence": 0.8,
        "frequency": 8.0,
        "normalise": False,
    }
    encoder = method.encoder
    assert len(encoder.layer1) == 2 and stage_channels(encoder) == [16, 32, 64, 128]
    assert encoder_stride(encoder) == 32 and encoder.conv1.in_channels == 2
    assert encoder.fc.out_features == 6 == method.unet.class_embedding.inner[0].in_features
    assert method.unet.class_embedding.inner[0].out_features == 32  # 4 × channels[0]
    head = method.spark_head
    assert head.decoder[0][0].in_channels == 32 and head.out.out_channels == 2
    assert [n.num_features for n in head.norms] == [128, 64, 32, 16]
    assert method.spark == {**SPARK_DEFAULTS, "mask_ratio": 0.5, "decoder_width": 32}
    assert build_method("cddpm", **TINY).hparams["condition_dim"] == 32  # 4 × channels[0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"test_timesteps": []},
            r"^method 'cddpm': hyperparameter test_timesteps is empty; paper: \[250, 500, 750\]$",
        ),
        ({"test_timesteps": [0, 500]}, r"\[0\] outside 1 … num_train_timesteps \(1000\)"),
        ({"test_timesteps": [21], "num_train_timesteps": 20}, r"\[21\] outside 1 … .*\(20\)"),
        ({"encoder": "resnet101"}, "encoder='resnet101'"),
        ({"encoder_widen_factor": 0}, "encoder_widen_factor=0, expected > 0"),
        ({"encoder_widen_factor": -1}, "encoder_widen_factor=-1"),
        ({"spark_settings": {"mask_ratio": 0}}, r"mask_ratio=0, expected in \(0, 1\)"),
        ({"spark_settings": {"mask_ratio": 1}}, "mask_ratio=1,"),
        ({"spark_settings": {"ratio": 0.5}}, r"unknown \['ratio'\]; valid: \['betas'"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(InputError, match=message):
        build_method("cddpm", **{**TINY, **settings})


def test_cddpm_without_pretraining():
    method = build_method("cddpm_nossl", **{**TINY_HPARAMS["cddpm_nossl"], "noise": "gaussian"})
    assert isinstance(method, CDDPMNoSSL) and not CDDPMNoSSL.pretrains
    assert [s.name for s in CDDPMNoSSL.stages] == [FINAL_STAGE]
    assert CDDPMNoSSL.stage(FINAL_STAGE).modules == ("encoder", "unet")
    assert not hasattr(method, "spark_head") and method.hparams["spark_settings"] == {}
    with pytest.raises(InputError, match=r"spark_settings \{'mask_ratio': 0.5\}: cddpm_nossl"):
        build_method(
            "cddpm_nossl", **TINY_HPARAMS["cddpm_nossl"], spark_settings={"mask_ratio": 0.5}
        )
    ids = {id(p) for p in method.configure_optimizer(1e-4).param_groups[0]["params"]}
    assert ids == {id(p) for p in [*method.encoder.parameters(), *method.unet.parameters()]}
