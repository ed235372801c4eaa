"""The denoising network every diffusion method builds: MONAI's ``DiffusionModelUNet``.

One place checks the per-level hyperparameters (one attention flag per level of ``channels``)
and builds the 2D UNet whose output has as many channels as its input (ε, x0 or v, as each
method predicts), so that a wrong configuration fails the same way for every method.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DiffusionModelUNet

from brainuad.errors import InputError


def check_levels(name: str, per_level: Sequence[object], channels: Sequence[int]) -> None:
    """Raise InputError unless ``per_level`` (hyperparameter ``name``) has one entry per level."""
    if len(per_level) != len(channels):
        raise InputError(
            f"hyperparameter {name} {tuple(per_level)} must have one entry per level of "
            f"channels {tuple(channels)}"
        )


def build_diffusion_unet(
    *,
    in_channels: int,
    channels: Sequence[int],
    attention_levels: Sequence[bool],
    num_res_blocks: int,
    num_head_channels: int | Sequence[int],
    norm_num_groups: int,
    resblock_updown: bool = False,
    num_class_embeds: int | None = None,
) -> DiffusionModelUNet:
    """A 2D ``DiffusionModelUNet`` mapping [B, C, H, W] (and timesteps [B]) to [B, C, H, W].

    ``num_class_embeds`` adds MONAI's label embedding (``class_labels`` [B] at call time),
    added to the time embedding of every residual block.
    """
    check_levels("attention_levels", attention_levels, channels)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        attention_levels=tuple(bool(a) for a in attention_levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        norm_num_groups=norm_num_groups,
        resblock_updown=resblock_updown,
        num_class_embeds=num_class_embeds,
    )
