"""Patched DDPM: one noised grid patch in training, patch-wise reconstruction stitched."""

from __future__ import annotations

import pytest
import torch
from tiny_hparams import PDDPM_TINY

from brainuad.errors import InputError
from brainuad.methods import build_method
from brainuad.methods.pddpm import grid_patch_masks


def test_grid_partitions_the_slice_row_major():
    masks = grid_patch_masks(96, 96, 48)
    assert masks.shape == (4, 1, 96, 96)
    assert torch.equal(masks.sum(dim=0), torch.ones(1, 96, 96, dtype=torch.long))
    # Row-major as the reference's BoxSampler.sample_grid: (0,0), (0,48), (48,0), (48,48).
    assert masks[1, 0, 0, 48] and not masks[1, 0, 48, 0]
    assert masks[2, 0, 48, 0] and masks[3, 0, 95, 95]
    # A size that does not divide the slice: border patches are cut off, still a partition.
    cut = grid_patch_masks(40, 40, 16)
    assert cut.shape[0] == 9
    assert torch.equal(cut.sum(dim=0), torch.ones(1, 40, 40, dtype=torch.long))
    assert int(cut[8].sum()) == 8 * 8
    with pytest.raises(InputError, match="patch_size"):
        grid_patch_masks(32, 32, 0)


def test_hparams_and_size_errors():
    method = build_method("pddpm", **PDDPM_TINY)
    assert method.hparams["patch_size"] == 16
    assert build_method("pddpm").hparams["patch_size"] == 48  # the paper's
    with pytest.raises(InputError, match="patch_size"):
        build_method("pddpm", **{**PDDPM_TINY, "patch_size": 0})
    with pytest.raises(ValueError, match="larger than"):
        method.score(torch.rand(1, 1, 8, 8), torch.ones(1, 1, 8, 8))


def _spy_unet(method, output=None):
    """Replace the network (``forward``) by a recorder returning its input (or ``output(x)``)."""
    seen = []

    def fake(x, timesteps):
        seen.append((x.clone(), timesteps.clone()))
        return x if output is None else output(x)

    method.forward = fake
    return seen


def test_training_noises_exactly_one_grid_patch():
    """The UNet sees x0 everywhere except in one grid patch per sample, which is noised;
    and the loss is the reference's: error inside that patch, averaged over the image."""
    torch.manual_seed(0)
    method = build_method("pddpm", **{**PDDPM_TINY, "noise": "gaussian"})
    seen = _spy_unet(method, output=torch.zeros_like)
    images = 0.2 + 0.6 * torch.rand(6, 1, 32, 32)
    batch = {"image": images, "brainmask": torch.ones(6, 1, 32, 32)}
    loss = method.training_loss(batch)
    (noisy, t), x0 = seen[0], images * 2 - 1
    masks = grid_patch_masks(32, 32, 16)[:, 0]
    chosen = []
    for b in range(6):
        differs = (noisy[b, 0] - x0[b, 0]).abs() > 1e-6
        matches = [k for k in range(4) if torch.equal(differs, masks[k])]
        assert len(matches) == 1, f"sample {b}: the noised region is not one grid patch"
        chosen.append(matches[0])
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    # Zero prediction: the error is |x0| inside the chosen patch, 0 outside, mean over all.
    expected = sum(float(x0[b, 0][masks[k]].abs().sum()) for b, k in enumerate(chosen))
    assert float(loss) == pytest.approx(expected / x0.numel(), rel=1e-5)


def test_scoring_stitches_each_patch_from_the_pass_that_noised_it():
    """With an identity 'UNet' every pass returns its input: patch k of the stitched image
    is noised only if it came from pass k. The result is x0 noised everywhere with ONE
    noise draw (the score generator's), i.e. the stitched patches share one draw."""
    method = build_method("pddpm", **{**PDDPM_TINY, "noise": "gaussian", "score_seed": 5})
    seen = _spy_unet(method)
    images, mask = torch.rand(3, 1, 32, 32), torch.ones(3, 1, 32, 32)
    out = method.score(images, mask)
    # One UNet batch holding all 4 patches of all 3 slices, all at index t − 1 = 499.
    assert len(seen) == 1
    assert seen[0][0].shape == (12, 1, 32, 32)
    assert torch.equal(seen[0][1], torch.full((12,), 499))
    x0 = images * 2 - 1
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.full((3,), 499)
    noised = method.scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(out.reconstruction, (noised + 1) / 2)
    torch.testing.assert_close(out.anomaly_map, (images - (noised + 1) / 2).abs()[:, 0])
    # Each pass noised exactly its own patch (pass k of slice b is row b * 4 + k).
    masks = grid_patch_masks(32, 32, 16)[:, 0]
    for row in range(12):
        b, k = divmod(row, 4)
        differs = (seen[0][0][row, 0] - x0[b, 0]).abs() > 1e-6
        assert torch.equal(differs, masks[k])


def test_batched_scoring_equals_the_references_patch_loop():
    """All patches of all slices in one UNet batch give the maps of the reference's loop
    (``unbatched_score``: one pass per patch of one slice); simplex noise is one pattern
    per call, so both see the same noise."""
    torch.manual_seed(0)
    method = build_method("pddpm", **{**PDDPM_TINY, "noise": "simplex"})
    for p in method.unet.parameters():  # a non-trivial network
        p.data.normal_(0, 0.05)
    images, mask = torch.rand(3, 1, 32, 32), torch.ones(3, 1, 32, 32)
    batched = method.score(images, mask)
    looped = method.unbatched_score(images, mask)
    assert batched.anomaly_map.std() > 0
    torch.testing.assert_close(batched.anomaly_map, looped.anomaly_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.reconstruction, looped.reconstruction, rtol=1e-5, atol=1e-5)
