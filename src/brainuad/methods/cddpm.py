"""cDDPM: a DDPM conditioned on a ResNet encoding of the clean slice, SparK-pretrained.

Behrendt, Bhattacharya, Mieling, Maack, Krüger, Opfer, Schlaefer, "Guided Reconstruction with
Conditioned Diffusion Models for Unsupervised Anomaly Detection in Brain MRIs",
arXiv 2312.04215 (Comput. Biol. Med. 2025). Reference code (facts checked, no code copied):
FinnBehrendt/Conditioned-Diffusion-Models-UAD.

Two stages, each its own Snakemake job (``stages``):

1. ``spark`` — SparK masked image modelling (Tian et al., ICLR 2023) of the encoder.
   The slice ``x`` ``[B, C, H, W]`` is cut into cells of the encoder's total stride ``s``
   (32 px: a 3 × 3 grid at 96 px); a random 35 % of the cells stay visible (exactly
   ``round(g² (1 − 0.65))`` per slice), the rest are zeroed. The ResNet runs as a *sparse*
   network: every convolution's and max-pool's output is multiplied by the visible-cell mask
   at its resolution, and every BatchNorm normalises with statistics over visible positions
   only (masked positions stay 0). The outputs of its four stages (strides s/8 … s) are
   normalised the same way, their masked positions filled with a learned mask token per
   level, projected (1 × 1 at the deepest level, 3 × 3 elsewhere) and fed, deepest first,
   into a light decoder (per level: 4 × 4 transposed convolution ×2, two 3 × 3 conv + BN,
   widths ``decoder_width / 2^k``) ending in a 1 × 1 convolution to ``C`` channels. Loss: the
   squared error averaged per cell, then averaged over the *masked* cells only (no per-patch
   normalisation: the reference sets ``pix_norm: False``). AdamW, lr 1e-4, weight decay 0.05,
   betas (0.9, 0.95), no augmentation.
2. ``model`` — the conditioned DDPM, trained end to end with the encoder (one Adam, lr 1e-4),
   starting from the SparK encoder (its ``fc`` and the SparK head are not loaded). As the
   DDPM (:mod:`brainuad.methods.ddpm`): x0 ∈ [0, 1] → [-1, 1], cosine schedule, T = 1000,
   x0 prediction, L1 loss, Behrendt's 2D simplex noise. The encoder reads the *clean* slice
   in [0, 1]: ``c = ResNet(x)`` ``[B, D]`` with ``D = 4 × channels[0]`` (512); ``c`` passes
   Linear(D, E)–SiLU–Linear(E, E) with ``E = 4 × channels[0]`` and is *concatenated* onto the
   time embedding ``[B, E]``, giving ``[B, 2E]``, which every residual block projects to its
   channels.

Scoring: ``c`` is computed once per slice; the slice is noised to each t ∈ {250, 500, 750}
(1-based) with a fresh noise draw per t, and x̂0 is predicted in one step — the three
noise levels as ONE batch of ``3B`` through the UNet. The three reconstructions are averaged
(the reference averages reconstructions, ``DDPM_2D.py``: ``reco_ensemble / len(timesteps)``),
and the map is |x − mean x̂0| averaged over channels.

Concatenation on MONAI's UNet, exactly: MONAI adds ``class_embedding(class_labels)`` to the
time embedding. Here the time embedding writes its E values into the first half of a zero
vector of 2E and the condition MLP into the second half, so their sum IS the concatenation,
and each residual block's ``time_emb_proj`` takes 2E inputs. Since a block applies SiLU and
a Linear to the embedding, ``Linear(SiLU([e_t; e_c]))`` is the reference's computation,
whereas an additive embedding (``Linear(SiLU(e_t + e_c))``) would mix the two before the
nonlinearity and halve the embedding's width; the exact route costs a few lines and keeps
MONAI's forward untouched.

Defaults and where they come from:

- Encoder ResNet-50, 1 input channel, D = 512 outputs (``DDPM_2D.py``: ``cond_dim =
  unet_dim × 4``; ``models.py`` ``build_encoder``, timm ``resnet50``). MONAI's
  ``resnet50(spatial_dims=2, n_input_channels=1, num_classes=512, conv1_t_stride=2,
  bias_downsample=False)`` is timm's layout (7 × 7 stride-2 stem, max pool, total stride 32,
  no bias in the shortcut convolution), 24.55 M parameters.
- Condition MLP and concatenation: ``OpenAI_Unet.py`` (``label_emb``, ``th.cat([emb,
  label_emb(cond)], 1)``, ``fac = 2``).
- Ensemble t ∈ {250, 500, 750}, fresh noise per t: ``DDPM_2D.py`` ``test_step``
  (``step_ensemble``, ``gen_noise`` inside the loop, ``t − 1``).
- UNet, schedule, loss, noise, batch 32, lr 1e-4, 1200 epochs:
  ``configs/experiment/cDDPM/DDPM_cond_spark_2D.yaml`` and :mod:`brainuad.methods.ddpm`.
- SparK: mask ratio 0.65, 1200 epochs (``configs/experiment/cDDPM/Spark_2D_pretrain.yaml``);
  decoder width 512, 4 pyramid levels, BN in encoder–decoder links, no positional
  embedding, L2 on masked cells, no pixel normalisation (``configs/model/Spark_2D.yaml``);
  sparse conv/BN, mask tokens, decoder (``src/models/modules/spark/{Spark_2D,encoder,
  decoder}.py``); AdamW 1e-4, weight decay 0.05, betas (0.9, 0.95) (``src/models/Spark_2D.py``
  ``configure_optimizers``); the encoder loaded without ``fc`` (``DDPM_2D.py``).

Cells at other sizes: the cell is always the encoder's total stride, so the mask is exact at
every level. At 96 px with the max pool: 32-px cells, 3 × 3 grid, 3 visible (the paper). At
64 px the CPU configs drop the max pool (``encoder_max_pool: false``, stride 16): 16-px cells,
a 4 × 4 grid, 6 visible (mask ratio 0.625). At 32 px (tests): 2 × 2 grid, 1 visible (0.75).
A grid without at least one visible and one masked cell is refused.

Deviations from the reference:

- MONAI ``DiffusionModelUNet`` (additive time projection instead of scale-shift norm) and
  MONAI's ResNet instead of timm's: no drop path (timm's SparK ResNet-50 has rate 0.05).
- SparK masks are drawn from the global torch RNG in the shared loop; the sparse network is
  emulated with forward hooks and masked BatchNorm on MONAI's ResNet (same arithmetic as the
  reference's module swap, same parameter names as the dense encoder).
- The SparK decoder's weights live in the method (unused by the ``model`` stage and not
  loaded into it), so ``model.pt`` carries an untrained copy of them.
- ``cddpm_nossl`` (a second registered class, :class:`CDDPMNoSSL`) is the paper's cDDPM
  without pretraining: one stage, a randomly initialised encoder, no SparK head.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from monai.networks import nets as monai_nets
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, DiffusionUNetResnetBlock
from torch import nn

from brainuad.errors import InputError
from brainuad.methods.base import (
    FINAL_STAGE,
    ScoreOutput,
    Stage,
    check_choice,
    load_matching_state,
    read_method_file,
    reconstruction_loss,
    residual_map,
)
from brainuad.methods.ddpm import DDPM
from brainuad.methods.registry import register

SPARK_STAGE = "spark"
ENCODERS = ("resnet10", "resnet18", "resnet34", "resnet50")
#: SparK settings (``spark_settings``) and their reference values.
SPARK_DEFAULTS: dict[str, Any] = {
    "mask_ratio": 0.65,
    "decoder_width": 512,
    "weight_decay": 0.05,
    "betas": (0.9, 0.95),
}


# -- encoder -------------------------------------------------------------------------------


def build_encoder(
    kind: str, *, in_channels: int, out_features: int, widen_factor: float, max_pool: bool
) -> monai_nets.ResNet:
    """MONAI ResNet in timm's layout (stride-2 7 × 7 stem, no shortcut bias): ``[B, C, H, W]``
    → ``[B, out_features]``."""
    return getattr(monai_nets, kind)(
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=out_features,
        conv1_t_stride=2,
        no_max_pool=not max_pool,
        widen_factor=widen_factor,
        bias_downsample=False,
    )


def encoder_stride(encoder: monai_nets.ResNet) -> int:
    """Total downsampling of the ResNet's last stage: 32, or 16 without the max pool."""
    return 16 if encoder.no_max_pool else 32


def stage_channels(encoder: monai_nets.ResNet) -> list[int]:
    """Output channels of ``layer1`` … ``layer4`` (each stage's last BatchNorm)."""
    channels = []
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
        channels.append(norms[-1].num_features)
    return channels


def encoder_pyramid(encoder: monai_nets.ResNet, images: torch.Tensor) -> list[torch.Tensor]:
    """The four stage outputs ``[B, C_k, H / s_k, W / s_k]`` of the ResNet, shallowest first."""
    x = encoder.act(encoder.bn1(encoder.conv1(images)))
    if not encoder.no_max_pool:
        x = encoder.maxpool(x)
    features = []
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        x = layer(x)
        features.append(x)
    return features


# -- SparK ---------------------------------------------------------------------------------


def expand_cells(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cell mask ``[B, 1, gh, gw]`` repeated to the resolution of ``like`` ``[B, *, h, w]``."""
    gh, gw = active.shape[-2:]
    h, w = like.shape[-2:]
    if h % gh or w % gw:
        raise RuntimeError(f"feature map {h} × {w} is not a multiple of the mask grid {gh} × {gw}")
    return active.repeat_interleave(h // gh, dim=2).repeat_interleave(w // gw, dim=3)


def random_active_cells(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Visible cells ``[B, 1, gh, gw]`` (bool): ``round(gh gw (1 − mask_ratio))`` per slice,
    chosen uniformly (SparK's ``mask``)."""
    gh, gw = grid
    cells = gh * gw
    keep = round(cells * (1 - mask_ratio))
    if not 0 < keep < cells:
        raise InputError(
            f"SparK: a {gh} × {gw} grid with mask ratio {mask_ratio} keeps {keep} of {cells} "
            "cells visible; at least one must be visible and one masked (use a larger slice "
            "or encoder_max_pool: false for 16-px cells)"
        )
    order = torch.rand(batch, cells, generator=generator, device=device).argsort(dim=1)
    active = torch.zeros(batch, cells, dtype=torch.bool, device=device)
    active.scatter_(1, order[:, :keep], True)
    return active.view(batch, 1, gh, gw)


def masked_cell_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """SparK's loss: squared error averaged within each cell, then over masked cells only.

    Args:
        reconstruction, target: ``[B, C, H, W]``.
        active: visible cells ``[B, 1, gh, gw]`` (bool); H, W multiples of gh, gw.
    """
    gh, gw = active.shape[-2:]
    error = (reconstruction.float() - target.float()).square().mean(dim=1, keepdim=True)
    per_cell = F.avg_pool2d(error, (error.shape[-2] // gh, error.shape[-1] // gw))
    masked = (~active).float()
    return (per_cell * masked).sum() / (masked.sum() + 1e-8)


def sparse_batch_norm(norm: nn.BatchNorm2d, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``x`` ``[B, C, H, W]`` over the positions where ``active`` ``[B, 1, H, W]``
    is True (statistics and running averages from those only); 0 elsewhere."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    use_batch_stats = norm.training or norm.running_mean is None
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    channels_last = x.permute(0, 2, 3, 1)
    where = active[:, 0]
    normalised = F.batch_norm(
        channels_last[where],
        norm.running_mean if not norm.training or norm.track_running_stats else None,
        norm.running_var if not norm.training or norm.track_running_stats else None,
        norm.weight,
        norm.bias,
        use_batch_stats,
        momentum,
        norm.eps,
    )
    out = normalised.new_zeros(channels_last.shape)
    out[where] = normalised
    return out.permute(0, 3, 1, 2)


@contextlib.contextmanager
def sparse_mode(encoder: nn.Module, active: torch.Tensor) -> Iterator[None]:
    """Run ``encoder`` as a sparse network for the visible cells ``active`` ``[B, 1, gh, gw]``:
    every Conv2d / MaxPool2d output is multiplied by the mask at its resolution, every
    BatchNorm2d normalises over visible positions only. Restores the dense encoder on exit."""

    def mask_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * expand_cells(active, output).to(output.dtype)

    handles = [
        m.register_forward_hook(mask_output)
        for m in encoder.modules()
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
    ]
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        # An instance attribute shadows the class's forward; deleting it restores it.
        norm.forward = lambda x, norm=norm: sparse_batch_norm(norm, x, expand_cells(active, x))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for norm in norms:
            del norm.forward


def _init_decoder(module: nn.Module) -> None:
    """The reference's decoder initialisation (``decoder.py`` ``initialize``)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _decoder_level(c_in: int, c_out: int) -> nn.Sequential:
    """×2 upsampling (4 × 4 transposed conv) and two 3 × 3 conv + BN, ReLU6 between."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_in, kernel_size=4, stride=2, padding=1),
        nn.Conv2d(c_in, c_in, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU6(inplace=True),
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
    )


class SparKHead(nn.Module):
    """Mask tokens, encoder–decoder links and light decoder of SparK.

    Input: the sparse encoder's four stage outputs (shallowest first) and the visible cells;
    output: the reconstruction ``[B, out_channels, H, W]``.
    """

    def __init__(
        self, *, feature_channels: Sequence[int], stride: int, width: int, out_channels: int
    ) -> None:
        super().__init__()
        levels = round(math.log2(stride))
        if 2**levels != stride or width % 2**levels:
            raise InputError(
                f"spark_settings.decoder_width={width} must be divisible by the encoder "
                f"stride {stride} (a power of two)"
            )
        deepest_first = list(reversed(feature_channels))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in deepest_first)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, 1, 1), std=0.02, a=-0.02, b=0.02))
            for c in deepest_first
        )
        links: list[nn.Module] = []
        for i, c in enumerate(deepest_first):
            kernel = 1 if i == 0 else 3
            d = width // 2**i
            same = i == 0 and c == d
            links.append(nn.Identity() if same else nn.Conv2d(c, d, kernel, padding=kernel // 2))
        self.links = nn.ModuleList(links)
        widths = [width // 2**k for k in range(levels + 1)]
        self.decoder = nn.ModuleList(_decoder_level(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Conv2d(widths[-1], out_channels, kernel_size=1)
        _init_decoder(self.decoder)
        _init_decoder(self.out)

    def forward(self, features: Sequence[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        to_decoder = []
        for i, feature in enumerate(reversed(features)):
            where = expand_cells(active, feature)
            feature = sparse_batch_norm(self.norms[i], feature, where)
            token = self.mask_tokens[i].to(feature.dtype).expand_as(feature)
            to_decoder.append(self.links[i](torch.where(where, feature, token)))
        x: torch.Tensor | int = 0
        for i, level in enumerate(self.decoder):
            if i < len(to_decoder):
                x = x + to_decoder[i]
            x = level(x)
        return self.out(x)


# -- conditioning --------------------------------------------------------------------------


class EmbeddingSlot(nn.Module):
    """``inner(x)`` ``[B, E]`` written into slot ``slot`` of a zero vector ``[B, slots × E]``:
    summing the slots' outputs concatenates them."""

    def __init__(self, inner: nn.Module, *, width: int, slot: int, slots: int = 2) -> None:
        super().__init__()
        self.inner, self.width, self.slot, self.slots = inner, width, slot, slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.slot * self.width
        after = (self.slots - 1 - self.slot) * self.width
        return F.pad(self.inner(x), (before, after))


def concatenate_condition(unet: DiffusionModelUNet, condition_dim: int) -> None:
    """Make ``unet(x, t, class_labels=c)`` take a continuous condition ``c`` ``[B, D]``
    through Linear–SiLU–Linear, concatenated onto the time embedding (in place)."""
    width = unet.time_embed[-1].out_features
    unet.time_embed = EmbeddingSlot(unet.time_embed, width=width, slot=0)
    mlp = nn.Sequential(nn.Linear(condition_dim, width), nn.SiLU(), nn.Linear(width, width))
    unet.class_embedding = EmbeddingSlot(mlp, width=width, slot=1)
    unet.num_class_embeds = condition_dim  # MONAI's forward adds class_embedding(class_labels)
    for block in unet.modules():
        if isinstance(block, DiffusionUNetResnetBlock):
            block.time_emb_proj = nn.Linear(2 * width, block.time_emb_proj.out_features)


# -- the method ----------------------------------------------------------------------------


@register("cddpm")
class CDDPM(DDPM):
    """Conditioned DDPM (cDDPM) with a SparK-pretrained ResNet encoder.

    Args: those of :class:`~brainuad.methods.ddpm.DDPM` (same defaults: the reference's
    UNet 128 × [1, 2, 2], 3 residual blocks, cosine T = 1000, simplex noise, L1, Adam), except
    ``test_timestep``, replaced by:
        test_timesteps: the noise ensemble, 1-based (paper: 250, 500, 750).
        encoder: MONAI ResNet depth (paper: ``"resnet50"``; ``"resnet10"``/``"resnet18"``
            for CPU studies).
        encoder_widen_factor: ResNet width multiplier (paper: 1).
        encoder_max_pool: keep the stem's max pool (paper: True, total stride 32 and 32-px
            SparK cells); False: stride 16, 16-px cells (for 64 px and smaller slices).
        condition_dim: encoder outputs D; None: 4 × ``channels[0]`` (the reference's rule,
            512).
        spark_settings: SparK pretraining (:data:`SPARK_DEFAULTS`): ``mask_ratio`` (0.65),
            ``decoder_width`` (512), AdamW ``weight_decay`` (0.05) and ``betas``
            (0.9, 0.95).

    ``test_timesteps`` and ``score_seed`` only affect scoring. Input ``[B, C, H, W]`` in
    [0, 1]; for SparK, H and W divisible by the encoder stride (32, or 16).
    """

    stages = (
        Stage(SPARK_STAGE, modules=("encoder", "spark_head")),
        Stage(FINAL_STAGE, consumes=(SPARK_STAGE,), modules=("encoder", "unet")),
    )
    scoring_hparams = frozenset({"test_timesteps", "score_seed"})
    #: Whether the method has a SparK stage (and builds its head).
    pretrains: ClassVar[bool] = True

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 256, 256),
        attention_levels: Sequence[bool] = (False, False, False),
        num_res_blocks: int = 3,
        num_head_channels: int = 64,
        norm_num_groups: int = 32,
        resblock_updown: bool = True,
        num_train_timesteps: int = 1000,
        schedule: str = "cosine",
        test_timesteps: Sequence[int] = (250, 500, 750),
        noise: Literal["gaussian", "simplex", "simplex_3d"] = "simplex",
        noise_settings: dict[str, Any] | None = None,
        loss: Literal["l1", "l2"] = "l1",
        loss_region: Literal["brain", "image"] = "image",
        score_seed: int = 0,
        optimizer: Literal["adam", "adamw"] = "adam",
        weight_decay: float = 0.0,
        encoder: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet50",
        encoder_widen_factor: float = 1.0,
        encoder_max_pool: bool = True,
        condition_dim: int | None = None,
        spark_settings: dict[str, Any] | None = None,
    ) -> None:
        test_timesteps = tuple(int(t) for t in test_timesteps)
        if not test_timesteps:
            raise InputError("hyperparameter test_timesteps is empty; paper: [250, 500, 750]")
        bad = [t for t in test_timesteps if not 1 <= t <= num_train_timesteps]
        if bad:
            raise InputError(
                f"hyperparameter test_timesteps {list(test_timesteps)}: {bad} outside 1 … "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        super().__init__(
            in_channels=in_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            test_timestep=test_timesteps[0],
            noise=noise,
            noise_settings=noise_settings,
            loss=loss,
            loss_region=loss_region,
            score_seed=score_seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
        )
        check_choice("encoder", encoder, ENCODERS)
        if not encoder_widen_factor > 0:
            raise InputError(
                f"hyperparameter encoder_widen_factor={encoder_widen_factor}, expected > 0"
            )
        condition_dim = int(condition_dim or 4 * int(channels[0]))
        spark = self._spark_settings(spark_settings)
        # The DDPM's hyperparameters, with the ensemble in place of its single test step.
        hparams = {k: v for k, v in self.hparams.items() if k != "test_timestep"}
        self.hparams = {
            **hparams,
            "test_timesteps": test_timesteps,
            "encoder": encoder,
            "encoder_widen_factor": float(encoder_widen_factor),
            "encoder_max_pool": bool(encoder_max_pool),
            "condition_dim": condition_dim,
            "spark_settings": dict(spark_settings or {}),
        }
        self.encoder = build_encoder(
            encoder,
            in_channels=int(in_channels),
            out_features=condition_dim,
            widen_factor=float(encoder_widen_factor),
            max_pool=bool(encoder_max_pool),
        )
        concatenate_condition(self.unet, condition_dim)
        self.spark = spark
        if self.pretrains:
            self.spark_head = SparKHead(
                feature_channels=stage_channels(self.encoder),
                stride=encoder_stride(self.encoder),
                width=int(spark["decoder_width"]),
                out_channels=int(in_channels),
            )

    def _spark_settings(self, given: dict[str, Any] | None) -> dict[str, Any]:
        given = dict(given or {})
        if given and not self.pretrains:
            raise InputError(
                f"hyperparameter spark_settings {given}: {self.name} has no SparK stage"
            )
        unknown = sorted(set(given) - set(SPARK_DEFAULTS))
        if unknown:
            raise InputError(
                f"hyperparameter spark_settings: unknown {unknown}; valid: {sorted(SPARK_DEFAULTS)}"
            )
        spark = {**SPARK_DEFAULTS, **given}
        if not 0 < float(spark["mask_ratio"]) < 1:
            raise InputError(
                f"hyperparameter spark_settings.mask_ratio={spark['mask_ratio']}, "
                "expected in (0, 1)"
            )
        spark["betas"] = tuple(float(b) for b in spark["betas"])
        return spark

    # -- the conditioned DDPM --------------------------------------------------------------

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """Predicted x0 ``[B, C, H, W]`` ([-1, 1] scale) from x_t, t ``[B]`` and the encoding
        ``condition`` ``[B, D]``."""
        return self.unet(noisy, timesteps, class_labels=condition)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"].float()
        condition = self.encoder(images)
        x0 = images * 2 - 1
        t = torch.randint(
            0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device
        ).long()
        noisy = self.scheduler.add_noise(x0, self._draw_noise(x0, t), t)
        return reconstruction_loss(
            self(noisy, t, condition),
            x0,
            batch["brainmask"],
            loss=self.hparams["loss"],
            region=self.hparams["loss_region"],
        )

    def _score(
        self, images: torch.Tensor, brainmask: torch.Tensor, generator: torch.Generator
    ) -> ScoreOutput:
        images = images.float()
        b = images.shape[0]
        condition = self.encoder(images)  # once per slice, reused by every ensemble member
        x0 = images * 2 - 1
        noisy, steps = [], []
        for timestep in self.hparams["test_timesteps"]:
            t = torch.full((b,), timestep - 1, device=x0.device, dtype=torch.long)
            noisy.append(self.scheduler.add_noise(x0, self._draw_noise(x0, t, generator), t))
            steps.append(t)
        k = len(steps)
        predicted = self(torch.cat(noisy), torch.cat(steps), condition.repeat(k, 1))
        reconstruction = ((predicted.float() + 1) / 2).view(k, *images.shape).mean(dim=0)
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)

    @torch.no_grad()
    def unbatched_score(self, images: torch.Tensor, brainmask: torch.Tensor) -> ScoreOutput:
        """The maps of :meth:`score` computed one slice and one noise level at a time (one
        encoder call per slice, one UNet call per slice and t): the loop that the batched
        scoring replaces, for benchmarks and tests. Equal to ``score`` for a single slice."""
        generator = torch.Generator(device=images.device).manual_seed(self.score_seed)
        was_training = self.training
        self.eval()
        try:
            reconstructions = []
            for i in range(images.shape[0]):
                image = images[i : i + 1].float()
                condition = self.encoder(image)
                x0 = image * 2 - 1
                total = torch.zeros_like(image)
                for timestep in self.hparams["test_timesteps"]:
                    t = torch.full((1,), timestep - 1, device=x0.device, dtype=torch.long)
                    noise = self._draw_noise(x0, t, generator)
                    noisy = self.scheduler.add_noise(x0, noise, t)
                    total += (self(noisy, t, condition).float() + 1) / 2
                reconstructions.append(total / len(self.hparams["test_timesteps"]))
        finally:
            self.train(was_training)
        reconstruction = torch.cat(reconstructions)
        return ScoreOutput(residual_map(images, reconstruction), reconstruction)

    # -- SparK -----------------------------------------------------------------------------

    def spark_loss(self, images: torch.Tensor) -> torch.Tensor:
        """SparK's masked-cell reconstruction loss on slices ``[B, C, H, W]`` in [0, 1]."""
        images = images.float()
        cell = encoder_stride(self.encoder)
        h, w = images.shape[-2:]
        if h % cell or w % cell:
            raise InputError(
                f"{self.name}: SparK needs slices whose size is a multiple of the encoder "
                f"stride {cell}, got {h} × {w}"
            )
        active = random_active_cells(
            images.shape[0], (h // cell, w // cell), self.spark["mask_ratio"], device=images.device
        )
        visible = images * expand_cells(active, images).to(images.dtype)
        with sparse_mode(self.encoder, active):
            features = encoder_pyramid(self.encoder, visible)
        reconstruction = self.spark_head(features, active)
        return masked_cell_loss(reconstruction, images, active)

    def stage_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if stage == SPARK_STAGE and self.pretrains:
            return self.spark_loss(batch["image"])
        return super().stage_loss(stage, batch)

    def configure_optimizer(
        self, learning_rate: float, stage: str = FINAL_STAGE
    ) -> torch.optim.Optimizer:
        if stage != SPARK_STAGE:
            return super().configure_optimizer(learning_rate, stage)
        return torch.optim.AdamW(
            self.stage_parameters(stage),
            lr=learning_rate,
            weight_decay=float(self.spark["weight_decay"]),
            betas=self.spark["betas"],
        )

    def load_stage(self, stage: str, path: str | Path) -> None:
        """From the SparK stage, only the encoder, without its ``fc`` (which SparK never
        trains) and without the SparK head, as the reference loads it."""
        if stage != SPARK_STAGE:
            super().load_stage(stage, path)
            return
        payload = read_method_file(Path(path))
        if payload["name"] != self.name:
            raise InputError(
                f"{path}: stage file of method {payload['name']!r}, expected {self.name!r}"
            )
        prefix = "encoder."
        state = {
            k[len(prefix) :]: v
            for k, v in payload["state_dict"].items()
            if k.startswith(prefix) and not k.startswith(prefix + "fc.")
        }
        load_matching_state(self.encoder, state, path, "this encoder", skip_prefix="fc.")


@register("cddpm_nossl")
class CDDPMNoSSL(CDDPM):
    """cDDPM without SparK pretraining: one stage, the encoder trained from scratch with the
    UNet. A second class rather than a hyperparameter because the workflow plans a method's
    jobs from its class's ``stages``."""

    stages = (Stage(FINAL_STAGE, modules=("encoder", "unet")),)
    pretrains = False


__all__ = [
    "CDDPM",
    "SPARK_DEFAULTS",
    "CDDPMNoSSL",
    "SparKHead",
    "concatenate_condition",
    "masked_cell_loss",
    "random_active_cells",
    "sparse_mode",
]
