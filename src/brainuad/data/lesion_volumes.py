"""Published lesion-volume summaries of the real cohorts, and draws of lesion volumes from them.

Each synthetic lesion kind imitates one public dataset; its total lesion volume per subject
is drawn so that the synthetic cohort's median and quartiles are the dataset's. The
summaries, their sources and which of them are approximate are documented in
``docs/synthetic.md``; the config (``synthetic.lesions.<kind>.volume_ml``) may override them.

The draw is a split (two-piece) log-normal: ``log V = log(median) + z * s`` with ``z`` a
standard normal and ``s = log(median / q1) / z75`` below the median, ``log(q3 / median) / z75``
above it (``z75 = 0.6745``, the normal's upper quartile). Its median and quartiles are exactly
the three given numbers, and it keeps the right skew of lesion loads.

A cohort of a handful of subjects drawn independently can miss the distribution by chance
(five draws put the median outside the interquartile range one time in five), so the
workflow stratifies: :func:`cohort_quantiles` gives each subject of a cohort its own stratum
``[i/n, (i+1)/n)`` of the distribution, in a seeded random order, and the volume is the
distribution's quantile at a random point of that stratum (Latin hypercube sampling).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from brainuad.errors import InputError

#: Upper quartile of the standard normal distribution.
Z75 = 0.6744897501960817


@dataclass(frozen=True)
class VolumeSummary:
    """Median and quartiles (ml) of one dataset's per-subject total lesion volume.

    Attributes:
        dataset: the dataset and the structure measured.
        q1_ml: first quartile.
        median_ml: median.
        q3_ml: third quartile.
        low_ml: smallest volume drawn (draws are clipped to ``[low_ml, high_ml]``).
        high_ml: largest volume drawn (a lesion must fit in one hemisphere).
        source: citation (paper, table or figure).
        approximate: the numbers are read off a figure or recalled, not copied from a table.
    """

    dataset: str
    q1_ml: float
    median_ml: float
    q3_ml: float
    low_ml: float
    high_ml: float
    source: str
    approximate: bool

    @property
    def quartiles(self) -> tuple[float, float, float]:
        """``(q1, median, q3)`` in ml."""
        return (self.q1_ml, self.median_ml, self.q3_ml)


#: Lesion kind of ``brainuad.data.synthetic`` -> the dataset it imitates.
PUBLISHED_VOLUMES: dict[str, VolumeSummary] = {
    "tumour": VolumeSummary(
        dataset="BraTS 2021, whole tumour (labels 1 + 2 + 4)",
        q1_ml=50.0,
        median_ml=80.0,
        q3_ml=120.0,
        low_ml=5.0,
        high_ml=300.0,
        source=(
            "Baid et al. 2021, arXiv:2107.02314 (dataset; no volume table); median from the "
            "BraTS 2016-17 cases of MSD Task01 (Antonelli et al. 2022, Nat. Commun. 13:4128), "
            "sub-region medians about 54 + 15 + 12 ml"
        ),
        approximate=True,
    ),
    "wmh": VolumeSummary(
        dataset="WMH Segmentation Challenge 2017, training set (Utrecht, Singapore, Amsterdam)",
        q1_ml=3.5,
        median_ml=9.0,
        q3_ml=20.0,
        low_ml=0.5,
        high_ml=150.0,
        source="Kuijf et al. 2019, IEEE TMI 38(11):2556-2568, Table I (WMH volumes per site)",
        approximate=True,
    ),
    "ms": VolumeSummary(
        dataset="MSLUB (30 MS patients, consensus lesion masks)",
        q1_ml=2.5,
        median_ml=6.0,
        q3_ml=15.0,
        low_ml=0.3,
        high_ml=80.0,
        source="Lesjak et al. 2018, Neuroinformatics 16(1):51-63, Table 2 (per-patient volumes)",
        approximate=True,
    ),
    "stroke": VolumeSummary(
        dataset="ATLAS v2.0, training set (655 T1w MRIs, chronic stroke)",
        q1_ml=1.2,
        median_ml=5.0,
        q3_ml=28.0,
        low_ml=0.1,
        high_ml=250.0,
        source="Liew et al. 2022, Sci. Data 9:320, Fig. 3 (lesion volume distribution)",
        approximate=True,
    ),
}


def check_quartiles(quartiles: tuple[float, float, float], where: str) -> tuple[float, ...]:
    """``(q1, median, q3)`` as floats; InputError naming ``where`` unless 0 < q1 <= median <= q3."""
    try:
        q1, median, q3 = (float(v) for v in quartiles)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: expected (q1, median, q3) in ml, got {quartiles!r}") from error
    if not 0.0 < q1 <= median <= q3:
        raise InputError(f"{where}: expected 0 < q1 <= median <= q3 (ml), got {quartiles!r}")
    return q1, median, q3


def lesion_volume_at(
    quantile: float, quartiles: tuple[float, float, float], bounds: tuple[float, float]
) -> float:
    """The total lesion volume (ml) at ``quantile`` of the split log-normal with these quartiles.

    Args:
        quantile: in (0, 1).
        quartiles: ``(q1, median, q3)`` in ml, ``0 < q1 <= median <= q3``.
        bounds: ``(low, high)`` in ml; the volume is clipped to it (tails only, so the
            quartiles are kept when ``low <= q1`` and ``q3 <= high``).

    Returns:
        The volume in ml.
    """
    if not 0.0 < quantile < 1.0:
        raise InputError(f"lesion volume quantile: expected a value in (0, 1), got {quantile!r}")
    q1, median, q3 = check_quartiles(quartiles, "lesion volume quartiles")
    z = NormalDist().inv_cdf(quantile)
    spread = math.log(median / q1) if z < 0 else math.log(q3 / median)
    volume = median * math.exp(z * spread / Z75)
    return float(np.clip(volume, *bounds))


def draw_lesion_volume(
    rng: np.random.Generator,
    quartiles: tuple[float, float, float],
    bounds: tuple[float, float],
) -> float:
    """One independent draw of :func:`lesion_volume_at` at a uniform random quantile."""
    quantile = float(np.clip(rng.uniform(), 1e-9, 1.0 - 1e-9))
    return lesion_volume_at(quantile, quartiles, bounds)


def cohort_quantiles(seed: int, dataset: str, n_subjects: int) -> np.ndarray:
    """Stratified quantiles of a cohort's subjects (subject order), for :func:`lesion_volume_at`.

    Subject ``i`` gets a uniform point of stratum ``perm[i]`` of ``n_subjects`` equal strata
    of (0, 1), with ``perm`` a random permutation; both seeded by ``(seed, dataset)``, so the
    same on every machine and independent of the subjects' own seeds.
    """
    if n_subjects < 1:
        raise InputError(f"n_subjects: expected at least 1, got {n_subjects!r}")
    digest = hashlib.sha256(f"{int(seed)}\0{dataset}\0lesion-volumes".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    strata = rng.permutation(n_subjects)
    return (strata + rng.uniform(0.02, 0.98, n_subjects)) / n_subjects
