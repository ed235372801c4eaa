"""Resampling slices between the study grid and a method's own working size.

A method may run at its reference size (96², 128², 256²) while the study's slices have
another; its inputs are resampled to its size and its maps back to the study grid before
post-processing. Images and maps: bilinear (``align_corners=False``, antialiased when
shrinking); masks: nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resampling of ``[B, C, H, W]`` to ``[B, C, size, size]`` (float32)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.float()
    shrinking = size < max(images.shape[-2:])
    return F.interpolate(
        images.float(),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=shrinking,
    )


def resize_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resampling of ``[B, C, H, W]`` masks to ``size`` × ``size``
    (dtype kept)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks
    return F.interpolate(masks.float(), size=(size, size), mode="nearest-exact").to(masks.dtype)


def resize_map(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resampling of anomaly maps ``[B, H', W']`` back to ``[B, height, width]``."""
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    return F.interpolate(
        maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[:, 0]
