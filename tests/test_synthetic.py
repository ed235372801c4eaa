"""Tests of the MNI template loader and the synthetic cohort generator."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainuad.data import synthetic
from brainuad.data.synthetic import (
    LESION_KINDS,
    SEQUENCES,
    TISSUE_LABELS,
    SyntheticSubject,
    generate_subject,
    subject_seed,
)
from brainuad.data.template import load_mni_template, template_t1_path, write_template_files
from brainuad.errors import InputError
from brainuad.io.nifti import load_nifti

# Coarse voxels keep the tests fast; the generator's logic does not depend on resolution.
COARSE = (2.5, 3.0)
MEDIUM = (1.6, 2.0)
TISSUE = {name: label for label, name in TISSUE_LABELS.items()}


@pytest.fixture(scope="module")
def subjects() -> dict[str, SyntheticSubject]:
    """One subject of each lesion kind, all from the same seed (so the same anatomy)."""
    return {
        kind: generate_subject(seed=11, lesion=kind, voxel_size_range=MEDIUM)
        for kind in LESION_KINDS
    }


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def _median(subject: SyntheticSubject, sequence: str, mask: np.ndarray) -> float:
    assert mask.sum() > 20, "too few voxels to measure a median"
    return float(np.median(_data(subject.images[sequence])[mask]))


def _healthy(subject: SyntheticSubject, tissue: str) -> np.ndarray:
    return (_data(subject.tissues) == TISSUE[tissue]) & (_data(subject.seg) == 0)


# --------------------------------------------------------------------------- template


def test_template_is_the_mni152_2009a_with_probabilities():
    tpl = load_mni_template()
    assert tpl.shape == (197, 233, 189)
    assert nib.aff2axcodes(tpl.affine) == ("R", "A", "S")
    assert tpl.brainmask.dtype == np.uint8 and set(np.unique(tpl.brainmask)) == {0, 1}
    for prob in (tpl.gm, tpl.wm, tpl.csf):
        assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    total = tpl.gm + tpl.wm + tpl.csf
    assert np.allclose(total[tpl.brainmask == 1], 1, atol=1e-4)
    assert np.all(total[tpl.brainmask == 0] == 0)
    assert 1.4e6 < tpl.brainmask.sum() < 2.2e6  # about 1.9 litres at 1 mm
    assert load_mni_template() is tpl, "the load is cached"
    assert not tpl.t1.flags.writeable, "cached arrays are protected from callers"
    assert template_t1_path().is_file()


def test_write_template_files_round_trip(tmp_path):
    t1_path, mask_path = tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz"
    write_template_files(t1_path, mask_path)
    tpl = load_mni_template()
    t1, mask = load_nifti(t1_path), load_nifti(mask_path)
    assert np.allclose(t1.affine, tpl.affine) and np.allclose(mask.affine, tpl.affine)
    assert np.array_equal(_data(mask), tpl.brainmask)
    assert np.allclose(_data(t1), tpl.t1)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_subject():
    a = generate_subject(seed=5, lesion="tumour", voxel_size_range=COARSE)
    b = generate_subject(seed=5, lesion="tumour", voxel_size_range=COARSE)
    for sequence in SEQUENCES:
        assert np.array_equal(_data(a.images[sequence]), _data(b.images[sequence]))
        assert np.array_equal(a.images[sequence].affine, b.images[sequence].affine)
    assert np.array_equal(_data(a.seg), _data(b.seg))
    assert np.array_equal(_data(a.brainmask), _data(b.brainmask))
    assert a.metadata == b.metadata


def test_different_seeds_give_different_subjects():
    a = generate_subject(seed=5, sequences=("t1",), voxel_size_range=COARSE)
    b = generate_subject(seed=6, sequences=("t1",), voxel_size_range=COARSE)
    assert a.images["t1"].shape != b.images["t1"].shape or not np.array_equal(
        _data(a.images["t1"]), _data(b.images["t1"])
    )
    assert not np.allclose(a.images["t1"].affine, b.images["t1"].affine)


def test_sequence_subset_and_lesion_leave_the_anatomy_unchanged(subjects):
    alone = generate_subject(seed=11, sequences=("flair",), voxel_size_range=MEDIUM)
    assert np.array_equal(_data(alone.images["flair"]), _data(subjects["none"].images["flair"]))
    # Same seed with a lesion: identical images away from the lesion.
    healthy, stroke = subjects["none"], subjects["stroke"]
    same = _data(healthy.images["t2"]) == _data(stroke.images["t2"])
    assert same[_data(stroke.seg) == 0].mean() > 0.97
    assert not same[_data(stroke.seg) > 0].any()


def test_subject_seed_is_stable_and_distinct():
    seed = subject_seed(3141, "synth_ixi", "sub-000")
    assert seed == subject_seed(3141, "synth_ixi", "sub-000")
    assert seed == 2418830507475561206  # hashlib-based: the same on every machine and run
    others = {
        subject_seed(3141, "synth_ixi", "sub-001"),
        subject_seed(3141, "synth_brats", "sub-000"),
        subject_seed(3142, "synth_ixi", "sub-000"),
    }
    assert seed not in others and len(others) == 3
    assert all(0 <= s < 2**63 for s in {seed, *others})


# --------------------------------------------------------------------------- geometry


def test_native_grid_is_non_ras_and_affine_is_correct(subjects):
    tpl = load_mni_template()
    centre = tpl.affine[:3, :3] @ np.argwhere(tpl.brainmask).mean(0) + tpl.affine[:3, 3]
    for seed in (1, 2, 3):
        subject = generate_subject(seed=seed, sequences=("t1",), voxel_size_range=COARSE)
        image = subject.images["t1"]
        assert nib.aff2axcodes(image.affine) != ("R", "A", "S")
        assert "".join(nib.aff2axcodes(image.affine)) == subject.metadata["orientation"]
        canonical = nib.as_closest_canonical(image)
        assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
        # The brain sits where the random translation put it, in world millimetres.
        mask = _data(subject.brainmask)
        world = image.affine[:3, :3] @ np.argwhere(mask).mean(0) + image.affine[:3, 3]
        expected = centre + np.array(subject.metadata["translation_mm"])
        assert np.linalg.norm(world - expected) < 5.0
        voxel = np.array(subject.metadata["voxel_size_mm"])
        assert np.all((voxel >= COARSE[0]) & (voxel <= COARSE[1]))
        assert np.allclose(sorted(image.header.get_zooms()), sorted(voxel), atol=1e-4)


def test_outputs_share_one_grid_and_types(subjects):
    subject = subjects["tumour"]
    for img in (*subject.images.values(), subject.seg, subject.brainmask, subject.tissues):
        assert img.shape == subject.seg.shape
        assert np.array_equal(img.affine, subject.seg.affine)
    for img in subject.images.values():
        data = _data(img)
        assert data.dtype == np.float32 and np.all(np.isfinite(data)) and data.min() >= 0
    assert _data(subject.seg).dtype == np.uint8 and _data(subject.brainmask).dtype == np.uint8
    json.dumps(subject.metadata)  # serialisable as it is


def test_head_has_skull_and_scalp_and_fits_the_field_of_view(subjects):
    subject = subjects["none"]
    brain = _data(subject.brainmask) == 1
    tissues = _data(subject.tissues)
    assert 1200 < subject.metadata["brain_volume_ml"] < 2600
    for layer in ("bone", "fat", "skin"):
        assert ((tissues == TISSUE[layer]) & ~brain).sum() > 0.05 * brain.sum()
    t1 = _data(subject.images["t1"])
    visible = t1 > 0.2 * np.median(t1[brain])
    assert (visible & ~brain).sum() > 0.3 * brain.sum(), "the scalp is visible outside the brain"
    faces = [tissues[0], tissues[-1], tissues[:, 0], tissues[:, -1], tissues[:, :, 0]]
    faces += [tissues[:, :, -1]]
    assert all(np.all(face == TISSUE["air"]) for face in faces), "air all around the head"


# --------------------------------------------------------------------------- lesions


def test_lesion_ground_truth(subjects):
    assert not _data(subjects["none"].seg).any()
    assert subjects["none"].metadata["lesion_volume_ml"] == 0
    for kind in ("tumour", "wmh", "ms", "stroke"):
        subject = subjects[kind]
        seg = _data(subject.seg)
        assert seg.any(), kind
        assert np.all(_data(subject.brainmask)[seg > 0] == 1), f"{kind} outside the brain"
        voxel_ml = np.prod(subject.metadata["voxel_size_mm"]) / 1000
        volume = subject.metadata["lesion_volume_ml"]
        assert volume == pytest.approx((seg > 0).sum() * voxel_ml, rel=1e-3)
        # the lesion has the volume drawn for it from the dataset's distribution
        drawn = subject.metadata["lesion_parameters"]["drawn_volume_ml"]
        assert volume == pytest.approx(drawn, rel=0.15, abs=0.05), kind
    tumour = subjects["tumour"]
    assert set(np.unique(_data(tumour.seg))) == {0, 1, 2, 3}
    wmh = _data(subjects["wmh"].seg)
    assert set(np.unique(wmh)) == {0, 1}
    assert ndimage.label(wmh)[1] >= 3, "periventricular parts and punctate deep lesions"
    assert ndimage.label(_data(subjects["ms"].seg))[1] >= 3, "several plaques"


def test_lesion_keeps_tissue_fractions_summing_to_one(monkeypatch):
    """A tumour that reaches past the brain surface replaces brain, not the CSF rim."""
    add_lesion = synthetic._add_lesion
    seen = []

    def spy(kind, rng, coords, grid, anatomy, tissue, *args):
        f = tissue.fractions
        before = sum(f.values())
        rim = f["csf"] - np.clip(tissue.brain - f["gm"] - f["wm"], 0.0, None)
        seg = add_lesion(kind, rng, coords, grid, anatomy, tissue, *args)
        lesion = sum(tissue.fractions[name] for name in ("necrosis", "oedema", "enhancing"))
        seen.append(
            (before, sum(tissue.fractions.values()), ((lesion > 0.05) & (rim > 0.05)).sum())
        )
        return seg

    monkeypatch.setattr(synthetic, "_add_lesion", spy)
    for seed in (1, 2, 3):
        generate_subject(seed=seed, lesion="tumour", sequences=("t1",), voxel_size_range=COARSE)
    for before, after, _ in seen:
        whole = np.abs(before - 1.0) < 1e-5
        assert whole.sum() > 1000
        np.testing.assert_allclose(after[whole], 1.0, atol=1e-5)
        np.testing.assert_allclose(after, before, atol=1e-5)
    # Seeds 1 and 2 put the tumour across the brain surface, over the CSF rim.
    assert sum(hits for *_, hits in seen) > 10


def test_contrast_orderings(subjects):
    s = subjects["none"]
    csf, gm, wm = (_healthy(s, t) for t in ("csf", "gm", "wm"))
    assert _median(s, "t1", wm) > _median(s, "t1", gm) > _median(s, "t1", csf)
    assert _median(s, "t2", csf) > _median(s, "t2", gm) > _median(s, "t2", wm)
    assert _median(s, "flair", gm) > _median(s, "flair", wm) > _median(s, "flair", csf)
    assert _median(s, "t1", _healthy(s, "fat")) > _median(s, "t1", wm), "fat is T1-bright"
    assert _median(s, "t1", _healthy(s, "bone")) < _median(s, "t1", gm), "bone is T1-dark"


def test_lesion_contrasts(subjects):
    for kind in ("tumour", "wmh", "ms", "stroke"):
        s = subjects[kind]
        lesion = _data(s.seg) > 0
        assert _median(s, "flair", lesion) > _median(s, "flair", _healthy(s, "wm")), kind
        assert _median(s, "t2", lesion) > _median(s, "t2", _healthy(s, "wm")), kind
    for kind in ("ms", "stroke"):  # T1-hypointense
        s = subjects[kind]
        assert _median(s, "t1", _data(s.seg) > 0) < _median(s, "t1", _healthy(s, "wm")), kind
    tumour = subjects["tumour"]
    core = _data(tumour.seg) == 1
    assert _median(tumour, "t1", core) < _median(tumour, "t1", _healthy(tumour, "gm"))
    assert _median(tumour, "t2", core) > _median(tumour, "t2", _healthy(tumour, "gm"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lesion": "glioma"}, "unknown lesion kind 'glioma'"),
        ({"sequences": ("t1", "dwi")}, "sequences"),
        ({"sequences": ()}, "sequences"),
        ({"voxel_size_range": (2.0, 1.0)}, "voxel_size_range"),
        ({"noise_fraction": -0.1}, "noise_fraction"),
        ({"seed": -1}, "seed"),
        ({"lesion": "tumour", "lesion_volume_ml": (30.0, 10.0, 40.0)}, "lesion_volume_ml"),
        ({"lesion": "wmh", "lesion_volume_ml": (1.0, 2.0)}, "lesion_volume_ml"),
        ({"lesion": "ms", "lesion_edge_mm": 9.0}, "lesion_edge_mm"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_subject(**{"seed": 1, **kwargs})
