"""Registration and the skull-strip glue, tested by what they are for: an affine registration
recovers a known shift and its inverse undoes it, transforms live only inside the block, the
seed is ANTs-valid, the identity only resamples, and skull-stripping dispatches to the chosen
method with its settings and carries the template mask back through the registration.

Small volumes (24³ at 4 mm) keep each ANTs call well under a second.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import ants
import numpy as np
import pytest
from scipy import ndimage

from brainuad.errors import InputError
from brainuad.preprocess import skullstrip, skullstrip_template
from brainuad.preprocess.register import ants_random_seed, identity, register
from brainuad.preprocess.skullstrip import SKULLSTRIP_METHODS, skull_strip
from brainuad.preprocess.skullstrip_template import registration_brainmask

SPACING = 4.0
SHAPE = (24, 24, 24)


def blob_volume(shift_voxels: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """An asymmetric head-like blob: an ellipsoid with an off-centre bright lump and a
    gradient, so that an affine registration has one answer."""
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.array([11.5, 11.5, 11.5]) + np.array(shift_voxels)
    radii = np.array([8.0, 6.5, 7.0])
    r2 = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    lump = sum((grid[i] - (centre[i] + (3, -2, 2)[i])) ** 2 for i in range(3))
    volume = (r2 < 1) * (1.0 + 0.04 * grid[0]) + 1.5 * np.exp(-lump / 6.0)
    return ndimage.gaussian_filter(volume.astype(np.float32), 0.7)


def image(data: np.ndarray, origin=(0.0, 0.0, 0.0)) -> ants.ANTsImage:
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32), origin=origin, spacing=(SPACING,) * 3
    )


def fake_registrations(monkeypatch, carried_back: np.ndarray) -> list[dict]:
    """Replace the registration of template stripping by one whose inverse carries
    ``carried_back`` onto the head whatever it is given; returns the record of every pass
    (fixed, moving, settings, and the interpolation of the carried mask)."""
    passes: list[dict] = []

    class FakeRegistration:
        def to_moving(self, img, interpolation):
            passes[-1]["interpolation"] = interpolation
            return image(carried_back.astype(np.float32))

    @contextlib.contextmanager
    def fake_register(fixed, moving, **settings):
        passes.append({"fixed": fixed, "moving": moving, "settings": settings})
        yield FakeRegistration()

    monkeypatch.setattr(skullstrip_template, "register", fake_register)
    return passes


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def temp_entries() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir()}


def test_affine_registration_recovers_a_known_shift_and_cleans_up() -> None:
    # the same voxels with the origin moved by 8 mm: the moving head sits 8 mm further along x
    fixed = image(blob_volume())
    moving = image(blob_volume(), origin=(8.0, 0.0, 0.0))
    before = temp_entries()
    with register(fixed, moving, type_of_transform="Affine", random_seed=3) as reg:
        assert reg.fixed is fixed and reg.moving is moving
        assert len(reg.forward) == 1 and len(reg.inverse) == 1
        folder = Path(reg.forward[0]).parent
        assert folder.parent == Path(tempfile.gettempdir())
        assert folder.name.startswith("brainuad_ants_")
        assert Path(reg.forward[0]).is_file() and reg.forward[0].endswith(".mat")
        transform = ants.read_transform(reg.forward[0])
        # a fixed-space point maps to the moving point 8 mm further along x (ITK convention)
        assert np.allclose(transform.apply_to_point((40.0, 40.0, 40.0)), (48, 40, 40), atol=1.0)
        aligned = reg.to_fixed(moving, "linear")
        assert aligned.shape == fixed.shape and aligned.origin == fixed.origin
        assert correlation(aligned.numpy(), fixed.numpy()) > 0.99
        # the inverse brings the fixed head onto the moving grid, where it matches the moving
        back = reg.to_moving(fixed, "linear")
        assert back.origin == moving.origin
        assert correlation(back.numpy(), moving.numpy()) > 0.99
        # onto another reference grid: a 2x coarser grid over the same field of view
        coarse = ants.resample_image(fixed, (2 * SPACING,) * 3, use_voxels=False, interp_type=0)
        on_coarse = reg.to_fixed(moving, "linear", reference=coarse)
        assert on_coarse.shape == coarse.shape
        assert correlation(on_coarse.numpy(), coarse.numpy()) > 0.98
    assert not folder.exists()
    assert temp_entries() <= before


def test_nearest_neighbour_keeps_label_values() -> None:
    fixed = image(blob_volume())
    labels = np.zeros(SHAPE, np.float32)
    labels[6:12, 8:14, 8:14] = 2
    labels[12:18, 8:14, 8:14] = 7
    moving = image(blob_volume(), origin=(8.0, 0.0, 0.0))
    with register(fixed, moving, random_seed=3) as reg:
        moved = reg.to_fixed(image(labels, origin=(8.0, 0.0, 0.0)), "nearestNeighbor").numpy()
        smooth = reg.to_fixed(image(labels, origin=(8.0, 0.0, 0.0)), "linear").numpy()
        # and back onto the moving grid: labels stay labels there too
        returned = reg.to_moving(image(moved), "nearestNeighbor").numpy()
    assert set(np.unique(returned)) == {0.0, 2.0, 7.0}
    assert set(np.unique(moved)) == {0.0, 2.0, 7.0}
    assert len(np.unique(smooth)) > 3  # linear interpolation mixes values; nearest does not
    # the labels move with the head: 8 mm back along x, onto the same voxels of the fixed
    # grid as of the moving one (the two arrays are the same, only the origins differ)
    assert (moved[7:11, 9:13, 9:13] == 2).all() and (moved[13:17, 9:13, 9:13] == 7).all()
    assert (moved[:5] == 0).all() and (moved[19:] == 0).all()


@pytest.mark.parametrize("seed", [0, -1, 1.5, "1"])
def test_register_refuses_seeds_that_ants_would_take_from_the_clock(seed) -> None:
    fixed = image(blob_volume())
    with pytest.raises(ValueError, match="random_seed"), register(fixed, fixed, random_seed=seed):
        pass


def test_ants_random_seed_is_in_the_valid_range_and_never_zero() -> None:
    top = 2**31 - 1  # ANTs seeds are 32-bit signed; 0 means "from the clock"
    assert ants_random_seed(0) == 1
    assert ants_random_seed(1) == 2
    assert ants_random_seed(2**31 - 3) == top - 1
    assert ants_random_seed(2**31 - 2) == 1  # wraps around, never to 0
    assert ants_random_seed(-1) == top - 1
    seeds = [ants_random_seed(s) for s in range(-5, 5)] + [ants_random_seed(10**12)]
    assert all(1 <= s <= top for s in seeds)
    assert len({ants_random_seed(s) for s in range(100)}) == 100  # distinct study seeds differ


def test_identity_only_resamples_onto_the_requested_grid() -> None:
    fixed = image(blob_volume())
    moving = image(blob_volume(shift_voxels=(2, 0, 0)))
    with identity(fixed, moving) as reg:
        assert reg.forward == reg.inverse and Path(reg.forward[0]).is_file()
        folder = Path(reg.forward[0]).parent
        assert folder.name.startswith("brainuad_ants_")
        same = reg.to_fixed(moving, "linear").numpy()
        back = reg.to_moving(fixed, "linear").numpy()
        coarse = ants.resample_image(fixed, (2 * SPACING,) * 3, use_voxels=False, interp_type=0)
        on_coarse = reg.to_fixed(moving, "nearestNeighbor", reference=coarse)
    assert np.allclose(same, moving.numpy(), atol=1e-5)  # nothing moves
    assert np.allclose(back, fixed.numpy(), atol=1e-5)
    assert on_coarse.shape == coarse.shape
    assert np.allclose(on_coarse.numpy(), moving.numpy()[::2, ::2, ::2], atol=1e-5)
    assert not folder.exists()


def test_template_stripping_carries_the_template_mask_onto_the_head() -> None:
    template = image(blob_volume())
    template_mask = image((blob_volume() > 0.5).astype(np.float32))
    # the subject: the template's head 2 voxels along x, with a "skull" shell around it
    shifted = blob_volume(shift_voxels=(2, 0, 0))
    truth = shifted > 0.5
    shell = ndimage.binary_dilation(truth, iterations=3) & ~ndimage.binary_dilation(truth)
    head = image(shifted + 0.8 * shell)
    mask = registration_brainmask(head, template, template_mask, random_seed=5)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert dice(mask, truth) > 0.93
    assert (mask & shell).sum() < 0.05 * shell.sum()  # the skull stays outside


def test_template_stripping_thresholds_the_interpolated_mask_at_one_half(monkeypatch) -> None:
    """The mask carried back linearly is a probability; voxels above 0.5 are brain."""
    template = image(blob_volume())
    probability = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    probability[0, 0, :4] = 0.5  # exactly one half is not brain
    passes = fake_registrations(monkeypatch, probability)
    head = image(blob_volume())
    mask = registration_brainmask(
        head, template, template, type_of_transform="Rigid", random_seed=9, refinements=0
    )
    assert np.array_equal(mask, probability > 0.5) and not mask[0, 0, :4].any()
    assert len(passes) == 1
    assert passes[0]["fixed"] is template and passes[0]["moving"] is head
    assert passes[0]["settings"] == {"type_of_transform": "Rigid", "random_seed": 9}
    assert passes[0]["interpolation"] == "linear"


def test_template_stripping_refines_on_the_head_cut_to_the_grown_mask(monkeypatch) -> None:
    template = image(blob_volume())
    template_mask = image((blob_volume() > 0.5).astype(np.float32))
    first = np.zeros(SHAPE, bool)
    first[10:14, 10:14, 10:14] = True
    passes = fake_registrations(monkeypatch, first)
    head_data = blob_volume() + 0.1
    mask = registration_brainmask(
        image(head_data), template, template_mask, refinements=2, margin_mm=8.0, random_seed=1
    )
    assert np.array_equal(mask, first)
    assert len(passes) == 3
    assert passes[0]["fixed"] is template
    assert np.array_equal(passes[0]["moving"].numpy(), head_data)
    # later passes: the template brain (template x its mask) and the head cut to the mask
    # grown by 8 mm = 2 voxels at 4 mm (a cross-shaped dilation, scipy's default)
    grown = ndimage.binary_dilation(first, iterations=2)
    for later in passes[1:]:
        assert np.allclose(later["fixed"].numpy(), template.numpy() * template_mask.numpy())
        assert np.allclose(later["moving"].numpy(), head_data * grown)


def test_template_stripping_stops_when_the_mask_is_empty(monkeypatch) -> None:
    passes = fake_registrations(monkeypatch, np.zeros(SHAPE))
    template = image(blob_volume())
    mask = registration_brainmask(image(blob_volume()), template, template, refinements=3)
    assert not mask.any() and mask.shape == SHAPE and len(passes) == 1


def test_skull_strip_dispatches_with_each_methods_settings(monkeypatch) -> None:
    head = image(blob_volume())
    template, template_mask = image(blob_volume()), image(np.ones(SHAPE, np.float32))
    seen = {}

    def fake_deepbet(data, *, threshold):
        seen["deepbet"] = (data.shape, threshold)
        return np.ones(SHAPE, bool)

    def fake_template(h, t1, m, *, type_of_transform, random_seed):
        seen["template"] = (h, t1, m, type_of_transform, random_seed)
        return np.zeros(SHAPE, bool)

    monkeypatch.setattr(skullstrip, "deepbet_brainmask", fake_deepbet)
    monkeypatch.setattr(skullstrip, "registration_brainmask", fake_template)
    common = {"template_t1": template, "template_brainmask": template_mask}
    out = skull_strip(head, method="deepbet", deepbet_threshold=0.7, **common)
    assert out.all() and seen["deepbet"] == (SHAPE, 0.7)
    out = skull_strip(head, method="template", registration_type="Rigid", random_seed=4, **common)
    assert not out.any()
    h, t1, m, *settings = seen["template"]
    assert h is head and t1 is template and m is template_mask and settings == ["Rigid", 4]
    # the defaults: deepbet at 0.5, an affine registration seeded 1
    skull_strip(head, method="deepbet", **common)
    skull_strip(head, method="template", **common)
    assert seen["deepbet"][1] == 0.5 and seen["template"][3:] == ("Affine", 1)
    with pytest.raises(InputError, match="hdbet_weights"):
        skull_strip(head, method="hdbet", hdbet_weights=None, **common)
    monkeypatch.setattr(
        skullstrip, "hdbet_brainmask", lambda h, *, weights: seen.update(hdbet=(h, weights))
    )
    skull_strip(head, method="hdbet", hdbet_weights="/weights", **common)
    assert seen["hdbet"][0] is head and seen["hdbet"][1] == "/weights"
    for method in ("none", "bet"):
        with pytest.raises(ValueError, match=f"'{method}' is not one of"):
            skull_strip(head, method=method, **common)
    assert SKULLSTRIP_METHODS == ("deepbet", "hdbet", "template", "none")


def test_template_stripping_defaults_to_one_seeded_affine_pass(monkeypatch) -> None:
    """The module's measured choice: a single affine pass (refinements cost twice as much for
    no gain), seed 1; a refinement grows the mask by 6 mm, at least one voxel."""
    full = np.zeros(SHAPE, bool)
    full[10:14, 10:14, 10:14] = True
    passes = fake_registrations(monkeypatch, full)
    template = image(blob_volume())
    head_data = blob_volume() + 0.1
    registration_brainmask(image(head_data), template, template)
    assert len(passes) == 1
    assert passes[0]["settings"] == {"type_of_transform": "Affine", "random_seed": 1}
    for margin_mm, voxels in ((None, 2), (4.0, 1), (1.0, 1)):  # 6 mm at 4 mm: 1.5 -> 2
        passes.clear()
        extra = {} if margin_mm is None else {"margin_mm": margin_mm}
        registration_brainmask(image(head_data), template, template, refinements=1, **extra)
        grown = ndimage.binary_dilation(full, iterations=voxels)
        assert np.allclose(passes[1]["moving"].numpy(), head_data * grown), margin_mm
    # on a 2 mm head the default 6 mm is 3 voxels
    passes.clear()
    head_2mm = ants.from_numpy(head_data, spacing=(2.0, 2.0, 2.0))
    registration_brainmask(head_2mm, template, template, refinements=1)
    grown = ndimage.binary_dilation(full, iterations=3)
    assert np.allclose(passes[1]["moving"].numpy(), head_data * grown)
