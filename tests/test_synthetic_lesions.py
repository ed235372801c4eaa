"""The synthetic lesions against the published statistics of the datasets they imitate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from brainuad.data import synthetic
from brainuad.data.lesion_volumes import (
    PUBLISHED_VOLUMES,
    check_quartiles,
    cohort_quantiles,
    draw_lesion_volume,
    lesion_volume_at,
)
from brainuad.data.synthetic import SyntheticSubject, generate_subject, subject_seed
from brainuad.errors import InputError

# Coarse voxels and one sequence keep this fast; lesion volumes are fitted on any grid.
COARSE = (2.5, 3.0)
N_SUBJECTS = 5


def _seg(subject: SyntheticSubject) -> np.ndarray:
    return np.asanyarray(subject.seg.dataobj) > 0


# --------------------------------------------------------------------------- volume draws


def test_draws_have_the_given_median_and_quartiles():
    rng = np.random.default_rng(0)
    quartiles = (1.2, 5.0, 28.0)  # ATLAS-like: strongly right-skewed
    draws = np.array([draw_lesion_volume(rng, quartiles, (0.01, 500.0)) for _ in range(4000)])
    np.testing.assert_allclose(np.percentile(draws, [25, 50, 75]), quartiles, rtol=0.08)
    assert draws.min() >= 0.01 and draws.max() <= 500.0
    clipped = [draw_lesion_volume(rng, quartiles, (2.0, 10.0)) for _ in range(200)]
    assert min(clipped) == 2.0 and max(clipped) == 10.0


def test_published_summaries_are_ordered_and_cited():
    assert set(PUBLISHED_VOLUMES) == set(synthetic.LESION_KINDS) - {"none"}
    for summary in PUBLISHED_VOLUMES.values():
        assert summary.low_ml < summary.q1_ml < summary.median_ml < summary.q3_ml
        assert summary.q3_ml < summary.high_ml
        assert "et al." in summary.source and summary.dataset


def test_quantiles_give_the_quartiles_and_cohorts_are_stratified():
    quartiles = (3.5, 9.0, 20.0)
    at = [lesion_volume_at(u, quartiles, (0.5, 150.0)) for u in (0.25, 0.5, 0.75)]
    np.testing.assert_allclose(at, quartiles, rtol=1e-4)
    assert lesion_volume_at(0.001, quartiles, (0.5, 150.0)) == 0.5  # clipped tail
    u = cohort_quantiles(3141, "synth_wmh", 5)
    assert np.array_equal(u, cohort_quantiles(3141, "synth_wmh", 5))
    assert not np.array_equal(u, cohort_quantiles(3141, "synth_mslub", 5))
    # one subject per fifth of the distribution, not in subject order
    assert sorted(np.floor(u * 5).astype(int)) == [0, 1, 2, 3, 4]
    assert not np.all(np.diff(u) > 0)
    with pytest.raises(InputError, match="quantile"):
        lesion_volume_at(1.0, quartiles, (0.5, 150.0))


@pytest.mark.parametrize("quartiles", [(0.0, 1.0, 2.0), (3.0, 2.0, 4.0), (1.0, 2.0), "abc"])
def test_bad_quartiles_are_refused(quartiles):
    with pytest.raises(InputError, match="q1"):
        check_quartiles(quartiles, "synthetic.lesions.wmh.volume_ml")


# --------------------------------------------------------------------------- cohorts


@pytest.fixture(scope="module")
def cohorts() -> dict[str, list[SyntheticSubject]]:
    """A handful of subjects per lesion kind, seeded and stratified as the workflow does."""
    cohorts = {}
    for kind in PUBLISHED_VOLUMES:
        quantiles = cohort_quantiles(3141, f"synth_{kind}", N_SUBJECTS)
        cohorts[kind] = [
            generate_subject(
                seed=subject_seed(3141, f"synth_{kind}", f"sub-{i:03d}"),
                lesion=kind,
                sequences=("flair",),
                voxel_size_range=COARSE,
                lesion_volume_quantile=float(quantiles[i]),
            )
            for i in range(N_SUBJECTS)
        ]
    return cohorts


@pytest.mark.parametrize("kind", sorted(PUBLISHED_VOLUMES))
def test_cohort_median_volume_is_inside_the_published_interquartile_range(cohorts, kind):
    volumes = [s.metadata["lesion_volume_ml"] for s in cohorts[kind]]
    summary = PUBLISHED_VOLUMES[kind]
    assert summary.q1_ml <= np.median(volumes) <= summary.q3_ml, (kind, volumes)
    for subject in cohorts[kind]:  # and each subject has the volume drawn for it
        drawn = subject.metadata["lesion_parameters"]["drawn_volume_ml"]
        assert subject.metadata["lesion_volume_ml"] == pytest.approx(drawn, rel=0.2, abs=0.1)


def test_config_quartiles_move_the_volumes():
    small = [
        generate_subject(seed=s, lesion="tumour", sequences=("flair",),
                         voxel_size_range=COARSE, lesion_volume_ml=(8.0, 10.0, 12.0))
        for s in (1, 2, 3)
    ]  # fmt: skip
    for subject in small:
        assert 5.0 < subject.metadata["lesion_volume_ml"] < 16.0


# --------------------------------------------------------------------------- WMH and MS shape


def _ventricle_distance(subject: SyntheticSubject) -> np.ndarray:
    """Distance (mm) to the template's lateral ventricles of every native voxel.

    Valid for subjects generated with ``deformation_mm=0``: then a native voxel's template
    point is ``M^-1 (x - c - t) + c`` (module docstring of brainuad.data.synthetic).
    """
    anatomy = synthetic._anatomy()
    meta = subject.metadata
    shape = subject.seg.shape
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    affine = subject.seg.affine
    x = affine[:3, :3] @ ijk + affine[:3, 3:]
    m = synthetic._rotation(np.array(meta["rotation_deg"])) @ np.diag(meta["scale"])
    c = anatomy.centre.reshape(3, 1)
    y = np.linalg.inv(m) @ (x - c - np.reshape(meta["translation_mm"], (3, 1))) + c
    tpl = np.linalg.inv(anatomy.template.affine)
    voxel = tpl[:3, :3] @ y + tpl[:3, 3:]
    return synthetic._sample_blocks(anatomy.ventricle_distance, voxel).reshape(shape)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_wmh_periventricular_lesions_touch_the_ventricles_and_punctate_ones_do_not(seed):
    subject = generate_subject(
        seed=seed, lesion="wmh", sequences=("flair",), voxel_size_range=(1.8, 2.2),
        deformation_mm=0.0,
    )  # fmt: skip
    distance = _ventricle_distance(subject)
    parts, n = ndimage.label(_seg(subject))
    nearest = ndimage.minimum(distance, parts, np.arange(1, n + 1))
    sizes = ndimage.sum(np.ones_like(distance), parts, np.arange(1, n + 1))
    periventricular = nearest <= 4.0
    assert periventricular.any() and (~periventricular).any(), nearest
    # the caps and bands hold most of the load; the punctate lesions lie in deep white
    # matter, beyond the 10 mm periventricular zone, and away from the caps
    assert sizes[periventricular].sum() > 0.6 * sizes.sum()
    assert np.all(nearest[~periventricular] > 10.0), nearest
    reach = subject.metadata["lesion_parameters"]["periventricular_reach_mm"]
    assert np.all(nearest[~periventricular] > reach)


def test_ms_plaques_are_ovoid_and_point_away_from_the_ventricles():
    subject = generate_subject(
        seed=4, lesion="ms", sequences=("flair",), voxel_size_range=(1.0, 1.2),
        deformation_mm=0.0, lesion_volume_ml=(20.0, 25.0, 30.0),
    )  # fmt: skip
    plaques = subject.metadata["lesion_parameters"]["plaques"]
    assert {p["place"] for p in plaques} >= {"periventricular", "deep"}
    seg = _seg(subject)
    affine = subject.seg.affine
    meta = subject.metadata
    m = synthetic._rotation(np.array(meta["rotation_deg"])) @ np.diag(meta["scale"])
    parts, _ = ndimage.label(seg)
    elongation, alignment = [], []
    for plaque in plaques:
        if plaque["place"] == "juxtacortical" or plaque["volume_ml"] < 0.4:
            continue
        # the subject-world voxels of this plaque: its component around its centre
        centre = m @ (np.array(plaque["centre_mm"]) - synthetic._anatomy().centre)
        centre += synthetic._anatomy().centre + np.array(meta["translation_mm"])
        ijk = np.round(np.linalg.solve(affine[:3, :3], centre - affine[:3, 3])).astype(int)
        label = parts[tuple(ijk)]
        volume_mm3 = (parts == label).sum() * np.prod(meta["voxel_size_mm"])
        if label == 0 or volume_mm3 > 1500 * plaque["volume_ml"]:
            continue  # merged with a neighbour, or cut off by the white matter
        points = affine[:3, :3] @ np.argwhere(parts == label).T
        values, vectors = np.linalg.eigh(np.cov(points))
        long_axis = np.linalg.solve(m, vectors[:, -1])
        elongation.append(values[-1] / values[0])
        alignment.append(abs(long_axis @ plaque["axis"]) / np.linalg.norm(long_axis))
    assert len(alignment) >= 3
    assert np.median(elongation) > 1.5, "ovoid, not round"
    assert np.median(alignment) > 0.85, alignment
