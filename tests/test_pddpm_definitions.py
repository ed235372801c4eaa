"""Patched DDPM (Behrendt et al., MIDL 2023; patched-Diffusion-Models-UAD, DDPM_patched.yaml)
by its definition, written out by hand: the training objective (t uniform in [0, T), one grid
patch noised per sample, the loss on the stitched output over the configured region), scoring
with noise that depends on t, the reference's defaults and the settings passed through."""

from __future__ import annotations

import pytest
import torch
from tiny_hparams import PDDPM_TINY

from brainuad.methods import build_method
from brainuad.methods.base import reconstruction_loss
from brainuad.methods.pddpm import grid_patch_masks


@pytest.mark.parametrize(("noise", "region"), [("gaussian", "brain"), ("simplex_3d", "image")])
def test_training_loss_by_hand(noise: str, region: str) -> None:
    method = build_method(
        "pddpm", **PDDPM_TINY | {"noise": noise, "loss": "l2", "loss_region": region}
    )
    network = method.forward
    seen = []
    method.forward = lambda x, timesteps: seen.append(timesteps.clone()) or network(x, timesteps)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 32, 32, generator=generator)
    brainmask = torch.zeros(3, 1, 32, 32)
    brainmask[:, :, 4:28, 6:30] = 1
    batch = {"image": images, "brainmask": brainmask}
    torch.manual_seed(11)
    loss = method.training_loss(batch)
    torch.manual_seed(11)
    x0 = images * 2 - 1
    masks = grid_patch_masks(32, 32, PDDPM_TINY["patch_size"])
    t = torch.randint(0, 1000, (3,))
    chosen = masks[torch.randint(0, masks.shape[0], (3,))]
    noised = method.scheduler.add_noise(x0, method._draw_noise(x0, t), t)
    with torch.no_grad():
        predicted = network(torch.where(chosen, noised, x0), t)
    expected = reconstruction_loss(
        torch.where(chosen, predicted, x0), x0, brainmask, loss="l2", region=region
    )
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.equal(seen[0], t)  # t uniform in [0, T), as drawn here


def test_scoring_noise_follows_the_test_timestep() -> None:
    """With noise that depends on t (AnoDDPM's simplex slice z = t), the batched scoring
    equals the reference's slice-by-slice, patch-by-patch loop."""
    method = build_method("pddpm", **PDDPM_TINY | {"noise": "simplex_3d", "test_timestep": 300})
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 1, 32, 32, generator=generator)
    brainmask = torch.ones(2, 1, 32, 32)
    batched = method.score(images, brainmask)
    looped = method.unbatched_score(images, brainmask)
    torch.testing.assert_close(batched.reconstruction, looped.reconstruction)


def test_defaults_are_the_references_and_settings_pass_through() -> None:
    defaults = build_method("pddpm").hparams
    assert {
        k: defaults[k]
        for k in (
            "patch_size",
            "channels",
            "num_res_blocks",
            "resblock_updown",
            "num_train_timesteps",
            "schedule",
            "test_timestep",
            "noise",
            "loss",
            "loss_region",
            "score_seed",
            "optimizer",
            "weight_decay",
        )
    } == {
        "patch_size": 48,
        "channels": (128, 256, 256),
        "num_res_blocks": 3,
        "resblock_updown": True,
        "num_train_timesteps": 1000,
        "schedule": "cosine",
        "test_timestep": 500,
        "noise": "simplex",
        "loss": "l1",
        "loss_region": "image",
        "score_seed": 0,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    settings = {
        "in_channels": 2,
        "num_res_blocks": 2,
        "resblock_updown": False,
        "num_train_timesteps": 200,
        "schedule": "linear_beta",
        "test_timestep": 100,
        "noise": "simplex",
        "noise_settings": {"octaves": 3, "frequency": 8},
        "loss": "l2",
        "loss_region": "brain",
        "score_seed": 7,
        "optimizer": "adamw",
        "weight_decay": 0.01,
    }
    method = build_method("pddpm", **PDDPM_TINY | settings)
    for key, value in settings.items():
        assert method.hparams[key] == value, key
    assert method.scheduler.num_train_timesteps == 200


def test_patch_sizes_at_the_edges() -> None:
    assert grid_patch_masks(4, 4, 1).shape == (16, 1, 4, 4)  # one-pixel patches
    method = build_method("pddpm", **PDDPM_TINY | {"patch_size": 32})
    masks = method.patch_masks(torch.zeros(1, 1, 32, 32))  # the whole slice: one patch
    assert masks.shape == (1, 1, 32, 32) and masks.all()
    with pytest.raises(ValueError, match="larger than the 32 x 16 slices"):
        method.patch_masks(torch.zeros(1, 1, 32, 16))
    with pytest.raises(ValueError, match="larger than the 16 x 32 slices"):
        method.patch_masks(torch.zeros(1, 1, 16, 32))
    build_method("pddpm", **PDDPM_TINY | {"patch_size": 1})
