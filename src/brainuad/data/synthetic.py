"""The embedded synthetic cohort: seeded head MRIs with voxel lesion ground truth.

The default study runs on this cohort so that the whole workflow (ingest, preprocessing,
training, scoring, metrics) can run anywhere, without downloading a dataset. Each subject is
made from the MNI152 2009a template (:mod:`brainuad.data.template`) and is fully determined
by its integer seed.

Geometry and coordinate conventions:
    * Template world: MNI millimetres, RAS+. Lesions are defined there, so they move with
      the anatomy.
    * Subject world: ``x = M (y - c) + c + t`` for a template point ``y``, where ``c`` is the
      brain centroid, ``M = R S`` a random rotation (+-10 degrees about each axis) times
      anisotropic scaling (+-8 %), ``t`` a translation of a few mm. On top of that, a smooth
      random displacement field ``u`` (cubic-spline interpolated noise on a 30 mm grid,
      root-mean-square magnitude ``deformation_mm``) perturbs the anatomy: the subject voxel at
      world ``x`` shows the template at ``M^-1 (x - c - t) + c + u``.
    * Native grid: axes aligned with subject world but permuted and flipped into a random
      orientation other than RAS (e.g. LPS, PIR, ASL), with a random, possibly anisotropic
      voxel size. The NIfTI affine (qform and sform, code 1) is exact, so
      ``nib.as_closest_canonical`` recovers RAS. The field of view holds the whole head plus
      5-15 mm of air on each side.

Head model: around the brain mask, layers at increasing distance from the brain surface:
CSF rim, skull bone (with a fatty marrow/diploe band in its middle), subcutaneous fat and
skin, with thicknesses drawn per subject and varied smoothly around the head.

Intensity model: every voxel holds partial-volume fractions ``p_k`` of tissue classes
(CSF, GM, WM, bone, marrow, fat, skin and the lesion classes); the clean signal of sequence
``s`` is ``sum_k p_k mu_sk (1 + tau_k n)``, with class means ``mu_sk`` from
``TISSUE_INTENSITY`` (jittered +-4 % per subject), texture amplitudes ``tau_k`` and one
smooth unit-variance texture field ``n``. It is multiplied by a smooth bias field
``exp(bias_strength * b_s)`` (``|b_s| <= 1``), made Rician (magnitude of the signal plus
complex Gaussian noise with sigma ``noise_fraction`` times the brightest brain-tissue mean)
and scaled by a random scanner gain.

Lesion model: each lesion kind imitates one public dataset (``tumour`` BraTS 2021, ``wmh``
the WMH Segmentation Challenge 2017, ``ms`` MSLUB, ``stroke`` ATLAS v2.0). The subject's
total lesion volume is drawn from that dataset's published distribution
(:mod:`brainuad.data.lesion_volumes`); the lesion is a sub-level set of a field in mm whose
level is fitted to that volume, with a partial-volume edge of ``LESION_EDGE_MM``. Shapes,
locations, contrasts and their sources: ``docs/synthetic.md``.

Random streams: geometry, head, lesion and each sequence draw from their own generator
seeded by ``(seed, stream)``, so the same seed gives the same anatomy whatever the lesion
kind or the subset of sequences asked for.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from brainuad.data.lesion_volumes import (
    PUBLISHED_VOLUMES,
    check_quartiles,
    draw_lesion_volume,
    lesion_volume_at,
)
from brainuad.data.template import MNITemplate, load_mni_template
from brainuad.errors import InputError

LESION_KINDS = ("none", "tumour", "wmh", "ms", "stroke")
SEQUENCES = ("t1", "t2", "flair")

#: Labels of ``SyntheticSubject.seg`` for each lesion kind (0 is healthy everywhere).
SEG_LABELS = {
    "none": {},
    "tumour": {1: "necrotic core", 2: "oedema", 3: "enhancing rim"},
    "wmh": {1: "white-matter hyperintensity"},
    "ms": {1: "multiple-sclerosis lesion"},
    "stroke": {1: "chronic infarct"},
}

#: Labels of ``SyntheticSubject.tissues``: the dominant healthy tissue of each voxel.
TISSUE_LABELS = {0: "air", 1: "csf", 2: "gm", 3: "wm", 4: "bone", 5: "fat", 6: "skin"}

_TISSUES = (
    "csf", "gm", "wm", "bone", "marrow", "fat", "skin",
    "necrosis", "oedema", "enhancing", "wmh", "ms", "stroke",
)  # fmt: skip

#: Mean signal of each tissue class per sequence, relative to white matter in T1.
#: T1: fat > WM > GM > CSF > bone; T2: CSF > GM > WM, bone dark; FLAIR: GM > WM, CSF dark,
#: lesions bright. Lesions as described for each dataset (sources in docs/synthetic.md):
#: tumour core T1-dark and T2-bright, oedema FLAIR-brightest; WMH T1 iso- to slightly
#: hypointense, T2/FLAIR-bright; MS lesions T1-hypointense (more than WMH: some are
#: "black holes"), T2/FLAIR-bright; a chronic infarct CSF-like in T1, bright in T2, and in
#: FLAIR between CSF-dark cavitation and bright gliosis.
TISSUE_INTENSITY: dict[str, dict[str, float]] = {
    "t1": {
        "csf": 0.22, "gm": 0.62, "wm": 1.00, "bone": 0.05, "marrow": 0.75, "fat": 1.15,
        "skin": 0.45, "necrosis": 0.20, "oedema": 0.52, "enhancing": 0.78, "wmh": 0.80,
        "ms": 0.66, "stroke": 0.28,
    },
    "t2": {
        "csf": 1.00, "gm": 0.52, "wm": 0.38, "bone": 0.04, "marrow": 0.45, "fat": 0.60,
        "skin": 0.30, "necrosis": 0.92, "oedema": 0.78, "enhancing": 0.60, "wmh": 0.72,
        "ms": 0.76, "stroke": 0.85,
    },
    "flair": {
        "csf": 0.08, "gm": 0.58, "wm": 0.44, "bone": 0.04, "marrow": 0.55, "fat": 0.75,
        "skin": 0.32, "necrosis": 0.45, "oedema": 0.95, "enhancing": 0.80, "wmh": 0.92,
        "ms": 0.90, "stroke": 0.68,
    },
}  # fmt: skip

# Relative texture amplitude per class: lesions and extracranial tissue are less uniform.
_TEXTURE = {
    "csf": 0.03, "gm": 0.05, "wm": 0.04, "bone": 0.15, "marrow": 0.15, "fat": 0.08,
    "skin": 0.08, "necrosis": 0.10, "oedema": 0.08, "enhancing": 0.12, "wmh": 0.05,
    "ms": 0.06, "stroke": 0.08,
}  # fmt: skip

# 2: a lesion no longer removes the CSF rim outside the brain. 3: lesion volumes drawn from
# the published distributions (brainuad.data.lesion_volumes), WMH periventricular caps and
# bands with punctate deep lesions, the `ms` kind, small subcortical strokes.
GENERATOR_VERSION = 3
_STREAM_GEOMETRY, _STREAM_HEAD, _STREAM_LESION, _STREAM_VOLUME, _STREAM_SEQUENCE = 0, 1, 2, 3, 10
_EDGE_MM = 1.0  # width of partial-volume ramps at tissue boundaries
_DISPLACEMENT_CAP = 2.5  # displacement components never exceed 2.5 sigma
_PAD_BLOCKS = 16  # air around the brain in the 2 mm distance grid (32 mm, > thickest head)


@dataclass(frozen=True, eq=False)
class SyntheticSubject:
    """One synthetic subject on its native (non-RAS, anisotropic) grid.

    Attributes:
        images: sequence name -> float32 head image (skull and scalp included).
        seg: uint8 lesion labels on the same grid, 0 = healthy (see ``SEG_LABELS``).
        brainmask: uint8 ground-truth brain mask on the same grid.
        metadata: JSON-serialisable record of the seed, lesion kind, geometry and volumes.
        tissues: uint8 dominant healthy tissue per voxel (see ``TISSUE_LABELS``); for QC
            and tests, not an input of the benchmark.
    """

    images: dict[str, nib.Nifti1Image]
    seg: nib.Nifti1Image
    brainmask: nib.Nifti1Image
    metadata: dict
    tissues: nib.Nifti1Image


def subject_seed(base_seed: int, dataset: str, subject: str) -> int:
    """A stable 63-bit seed for one subject of one dataset (same on every machine and run)."""
    digest = hashlib.sha256(f"{int(base_seed)}\0{dataset}\0{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------- template prep


@dataclass(frozen=True, eq=False)
class _Anatomy:
    """Template quantities derived once per process."""

    template: MNITemplate
    signed_distance: np.ndarray  # mm, > 0 outside the brain; padded 2 mm block grid
    centre: np.ndarray  # brain centroid, template world mm
    surface: np.ndarray  # (n, 3) points on the brain surface, template world mm
    ventricle_distance: np.ndarray  # mm to the lateral ventricles; padded 2 mm block grid
    ventricle_box: np.ndarray  # (2, 3) world mm corners of the lateral ventricles
    #: lesion kind or site name -> (n, 3) candidate centres, template world mm
    sites: dict[str, np.ndarray]

    @property
    def tumour_sites(self) -> np.ndarray:
        return self.sites["tumour"]

    @property
    def stroke_sites(self) -> np.ndarray:
        return self.sites["stroke"]


def _block_mean(array: np.ndarray) -> np.ndarray:
    pad = [(0, s % 2) for s in array.shape]
    a = np.pad(array.astype(np.float32), pad)
    n0, n1, n2 = (s // 2 for s in a.shape)
    return a.reshape(n0, 2, n1, 2, n2, 2).mean(axis=(1, 3, 5))


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm) to the mask boundary: positive outside, negative inside."""
    outside = ndimage.distance_transform_edt(~mask) * spacing
    inside = ndimage.distance_transform_edt(mask) * spacing
    # Distances are between voxel centres; the boundary lies half a voxel beyond them.
    return np.where(mask, -(inside - spacing / 2), outside - spacing / 2).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    tpl = load_mni_template()
    P = _PAD_BLOCKS
    brain = np.pad(_block_mean(tpl.brainmask) > 0.5, P)
    sdist = _signed_distance(brain, 2.0)
    gm, wm, csf = (np.pad(_block_mean(a), P) for a in (tpl.gm, tpl.wm, tpl.csf))
    # World coordinates of block centres: block b covers 1 mm voxels 2b and 2b + 1.
    idx = np.indices(brain.shape, dtype=np.float32).reshape(3, -1)
    vox = (idx - P) * 2 + 0.5
    world = (tpl.affine[:3, :3] @ vox + tpl.affine[:3, 3:]).reshape((3, *brain.shape))
    x, y, z = world

    vent = (csf > 0.5) & (sdist < -10) & (np.abs(x) < 30) & (y > -45) & (y < 30)
    vent &= (z > 0) & (z < 35)
    # Distance from the ventricle surface (half a block less than between block centres).
    dist_vent = np.maximum(ndimage.distance_transform_edt(~vent) * 2.0 - 1.0, 0.0)
    dist_vent = dist_vent.astype(np.float32)
    lateral_mca = (np.abs(x) > 35) & (y > -45) & (y < 25) & (z > 0) & (z < 45)
    deep_grey = (np.abs(x) > 12) & (np.abs(x) < 32) & (y > -25) & (y < 22) & (z > -6) & (z < 24)
    sites = {
        "tumour": (wm > 0.85) & (sdist < -15) & (np.abs(x) > 12) & (z > 0),
        "stroke": (gm > 0.4) & (sdist > -6) & (sdist < 0) & lateral_mca,
        # deep white matter beyond the periventricular zone (the "10 mm rule" plus margin)
        "deep_wm": (wm > 0.8) & (dist_vent >= 13) & (sdist < -8),
        "periventricular_wm": (wm > 0.6) & (dist_vent >= 1) & (dist_vent <= 6) & (sdist < -8),
        # white matter at the grey-white junction, just under the cortex
        "juxtacortical_wm": (wm > 0.5) & (gm > 0.2) & (sdist < -4) & (sdist > -12),
        # basal ganglia, internal capsule and corona radiata: lacunar and striatocapsular
        "subcortical": ((wm + gm) > 0.9) & deep_grey & (dist_vent >= 4) & (sdist < -15),
    }
    centre = tpl.affine[:3, :3] @ np.argwhere(tpl.brainmask).mean(0) + tpl.affine[:3, 3]
    surface = world[:, (sdist > -2.0) & (sdist < 0.0)].T.astype(np.float64)
    found = {}
    for kind, mask in sites.items():
        if mask.sum() < 10:  # pragma: no cover - only with a different template
            raise InputError(f"MNI template: too few candidate {kind} sites ({mask.sum()})")
        found[kind] = world[:, mask].T.astype(np.float64)
    vent_world = world[:, vent]
    return _Anatomy(
        template=tpl,
        signed_distance=sdist,
        centre=centre,
        surface=surface,
        ventricle_distance=dist_vent,
        ventricle_box=np.stack([vent_world.min(1), vent_world.max(1)]).astype(np.float64),
        sites=found,
    )


# --------------------------------------------------------------------------- random fields


def _spline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) matrix that interpolates n_ctrl evenly spaced values by cubic spline."""
    if n_ctrl == 1:
        return np.ones((n_out, 1), dtype=np.float32)
    spline = CubicSpline(np.linspace(0, 1, n_ctrl), np.eye(n_ctrl), bc_type="natural")
    return spline(np.linspace(0, 1, n_out)).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], voxel_mm: np.ndarray, spacing_mm: float
) -> np.ndarray:
    """Zero-mean smooth random field: Gaussian control points every ``spacing_mm``, splined.

    Separable interpolation (one small matrix product per axis) keeps this cheap on the
    full grid. The field is scaled to unit standard deviation.
    """
    n_ctrl = [
        max(2, math.ceil(n * v / spacing_mm) + 1) for n, v in zip(shape, voxel_mm, strict=True)
    ]
    field = rng.standard_normal(n_ctrl).astype(np.float32)
    for axis, n_out in enumerate(shape):
        field = np.moveaxis(
            np.tensordot(_spline_matrix(n_out, n_ctrl[axis]), field, axes=([1], [axis])),
            0,
            axis,
        )
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _ramp(z: np.ndarray, edge_mm: float = _EDGE_MM) -> np.ndarray:
    """Partial-volume step: 0 for z < -edge/2, 1 for z > edge/2, linear in between (z in mm)."""
    return np.clip(z / edge_mm + 0.5, 0.0, 1.0)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return _rotation(rng.uniform(-180, 180, 3))


# All axis permutations and flips except RAS itself.
_ORIENTATIONS = [
    (perm, flips)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((1, -1), repeat=3)
    if not (perm == (0, 1, 2) and flips == (1, 1, 1))
]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray  # native voxel -> subject world mm
    voxel_mm: np.ndarray  # per native axis
    to_template: np.ndarray  # 3 x 4: native voxel -> template voxel, before displacement
    max_displacement_mm: float


def _check_args(
    seed: int,
    lesion: str,
    sequences: Sequence[str],
    voxel_size_range: tuple[float, float],
    deformation_mm: float,
    bias_strength: float,
    noise_fraction: float,
) -> tuple[str, ...]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    if lesion not in LESION_KINDS:
        raise InputError(f"lesion: unknown lesion kind {lesion!r}, expected one of {LESION_KINDS}")
    if isinstance(sequences, str):
        sequences = (sequences,)
    sequences = tuple(sequences)
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown or not sequences or len(set(sequences)) != len(sequences):
        raise InputError(f"sequences: expected distinct names from {SEQUENCES}, got {sequences!r}")
    lo, hi = voxel_size_range
    if not 0.5 <= lo <= hi <= 5.0:
        raise InputError(
            f"voxel_size_range: expected 0.5 <= low <= high <= 5 mm, got {voxel_size_range!r}"
        )
    for name, value, top in (
        ("deformation_mm", deformation_mm, 10.0),
        ("bias_strength", bias_strength, 1.0),
        ("noise_fraction", noise_fraction, 0.5),
    ):
        if not 0.0 <= value <= top:
            raise InputError(f"{name}: expected a value in [0, {top}], got {value!r}")
    return sequences


def _make_grid(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    voxel_size_range: tuple[float, float],
    head_mm: float,
    deformation_mm: float,
    params: dict,
) -> _Grid:
    angles = rng.uniform(-10.0, 10.0, 3)
    scale = rng.uniform(0.92, 1.08, 3)
    translation = rng.uniform(-5.0, 5.0, 3)
    perm, flips = _ORIENTATIONS[rng.integers(len(_ORIENTATIONS))]
    voxel_mm = rng.uniform(*voxel_size_range, 3)
    air_lo, air_hi = rng.uniform(5.0, 15.0, 3), rng.uniform(5.0, 15.0, 3)

    c = anatomy.centre
    M = _rotation(angles) @ np.diag(scale)
    # Subject-world bounding box of the head: the moved brain surface plus the head layers.
    moved = (anatomy.surface - c) @ M.T + c + translation
    # 2 mm for the surface sampling; the displacement moves a point by at most max_disp.
    max_disp = _DISPLACEMENT_CAP * deformation_mm
    slack = (head_mm + max_disp) * scale.max() + 2.0
    box_lo = moved.min(0) - slack - air_lo
    box_hi = moved.max(0) + slack + air_hi

    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for axis in range(3):
        world_axis = perm[axis]
        n = math.ceil((box_hi[world_axis] - box_lo[world_axis]) / voxel_mm[axis]) + 1
        shape.append(int(n))
        affine[world_axis, axis] = flips[axis] * voxel_mm[axis]
        affine[world_axis, 3] = box_lo[world_axis] if flips[axis] > 0 else box_hi[world_axis]

    tpl_inv = np.linalg.inv(anatomy.template.affine)
    # native voxel v -> subject world x = A v + a -> template y = M^-1 (x - c - t) + c
    m_inv = np.linalg.inv(M)
    world_from_native = np.eye(4)
    world_from_native[:3, :3] = m_inv @ affine[:3, :3]
    world_from_native[:3, 3] = m_inv @ (affine[:3, 3] - c - translation) + c
    to_template = (tpl_inv @ world_from_native)[:3]

    params.update(
        rotation_deg=[round(float(a), 4) for a in angles],
        scale=[round(float(s), 5) for s in scale],
        translation_mm=[round(float(t), 4) for t in translation],
    )
    return _Grid(
        shape=tuple(shape),
        affine=affine,
        voxel_mm=voxel_mm,
        to_template=to_template,
        max_displacement_mm=max_disp,
    )


def _template_coordinates(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, deformation_mm: float
) -> np.ndarray:
    """Template voxel coordinates (3, *shape) of every native voxel, displacement included."""
    # Displacement in template world mm, converted to template voxels (1 mm RAS: identity).
    tpl_inv33 = np.linalg.inv(anatomy.template.affine)[:3, :3]
    # Soft-capped at _DISPLACEMENT_CAP standard deviations so the head surely fits the FOV.
    fields = [
        _DISPLACEMENT_CAP * np.tanh(_smooth_field(rng, grid.shape, grid.voxel_mm, 30.0)
                                    / _DISPLACEMENT_CAP)
        for _ in range(3)
    ]  # fmt: skip
    scale = deformation_mm / math.sqrt(3.0)  # RMS of |u| ~ deformation_mm
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    ii = [np.arange(n, dtype=np.float32) for n in grid.shape]
    G = grid.to_template
    for j in range(3):
        coords[j] = (
            G[j, 0] * ii[0][:, None, None]
            + G[j, 1] * ii[1][None, :, None]
            + G[j, 2] * ii[2][None, None, :]
            + G[j, 3]
        )
        for m in range(3):
            if tpl_inv33[j, m] != 0:
                coords[j] += (tpl_inv33[j, m] * scale) * fields[m]
    return coords


def _native_box(
    grid: _Grid, anatomy: _Anatomy, centre_mm: np.ndarray, radius_mm: float, max_disp: float
) -> tuple[slice, slice, slice]:
    """Native-grid slices that surely contain a template-world ball."""
    q = np.linalg.inv(anatomy.template.affine) @ np.append(centre_mm, 1.0)
    G = grid.to_template
    v = np.linalg.solve(G[:, :3], q[:3] - G[:, 3])
    reach = (radius_mm * 1.1 + max_disp + 2.0) / grid.voxel_mm
    return tuple(
        slice(int(max(0, np.floor(v[a] - reach[a]))), int(min(n, np.ceil(v[a] + reach[a]) + 1)))
        for a, n in enumerate(grid.shape)
    )


# --------------------------------------------------------------------------- lesions


@dataclass
class _Tissue:
    """Partial-volume fractions on the native grid (float32 arrays, same shape)."""

    fractions: dict[str, np.ndarray]
    brain: np.ndarray  # brain fraction (CSF + GM + WM inside the brain mask)


def _world(coords: np.ndarray, anatomy: _Anatomy, box: tuple[slice, ...]) -> np.ndarray:
    """Template world mm (3, ...) of the template voxel coordinates inside ``box``."""
    A = anatomy.template.affine
    q = coords[(slice(None), *box)]
    return np.einsum("jm,m...->j...", A[:3, :3], q) + A[:3, 3].reshape(3, 1, 1, 1)


def _ellipsoid_radius(rng: np.random.Generator, rel: np.ndarray, axes_mm: np.ndarray):
    """Normalised ellipsoidal radius of offsets ``rel`` (3, ...) for random orientation."""
    R = _random_rotation(rng)
    local = np.einsum("mj,m...->j...", R, rel)  # R^T rel
    return np.sqrt(sum((local[k] / axes_mm[k]) ** 2 for k in range(3)))


# Every lesion is a sub-level set {phi < level} of a field phi in mm (negative inside). The
# level is fitted so that the lesion has the volume drawn from its dataset's distribution
# (see _fit_level): shifting it grows or shrinks the whole outline by the same distance, so
# the shape is kept. A partial-volume ramp of width edge_mm around the level gives the
# lesion fractions, so edges are soft as in real images.

_SUBCORTICAL_STROKE_ML = 3.0  # ATLAS lesions smaller than this: lacunar/striatocapsular
#: Partial-volume edge width (mm) per lesion kind: WMH and oedema fade into white matter,
#: MS plaques and infarcts are sharper.
LESION_EDGE_MM = {"tumour": 2.5, "wmh": 2.0, "ms": 1.0, "stroke": 1.0}


def _fit_level(phi: np.ndarray, eligible: np.ndarray, n_voxels: float) -> float:
    """The level below which ``round(n_voxels)`` (at least one) eligible voxels of phi lie."""
    values = phi[eligible]
    if values.size == 0:
        return float("-inf")  # nowhere to put the lesion
    k = int(np.clip(round(n_voxels), 1, values.size)) - 1
    return float(np.partition(values, k)[k])


def _voxel_count(volume_ml: float, grid: _Grid) -> float:
    return volume_ml * 1000.0 / float(np.prod(grid.voxel_mm))


def _sphere_radius(volume_ml: float) -> float:
    return (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _sample_blocks(field: np.ndarray, tpl_voxel: np.ndarray) -> np.ndarray:
    """Trilinear sample of a padded 2 mm block-grid field at template voxel coords (3, ...)."""
    block = [(tpl_voxel[j] - 0.5) / 2.0 + _PAD_BLOCKS for j in range(3)]
    return ndimage.map_coordinates(field, block, order=1, mode="nearest", output=np.float32)


def _template_voxel(anatomy: _Anatomy, world: np.ndarray) -> np.ndarray:
    """Template voxel coordinates (3, n) of template world points (n, 3)."""
    inv = np.linalg.inv(anatomy.template.affine)
    return inv[:3, :3] @ np.atleast_2d(world).T + inv[:3, 3:]


def _uphill(anatomy: _Anatomy, field: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Unit vector (world) along which a block-grid ``field`` grows at ``point``."""
    steps = np.vstack([np.eye(3) * 2.0, -np.eye(3) * 2.0])
    values = _sample_blocks(field, _template_voxel(anatomy, point + steps))
    gradient = (values[:3] - values[3:]).astype(np.float64)
    norm = float(np.linalg.norm(gradient))
    return gradient / norm if norm > 1e-6 else np.array([0.0, 0.0, 1.0])


def _frame(rng: np.random.Generator, direction: np.ndarray | None) -> np.ndarray:
    """Orthonormal columns; the first along ``direction`` (random if None), the rest random."""
    frame = _random_rotation(rng)
    if direction is None:
        return frame
    d = direction / np.linalg.norm(direction)
    u = next(c - (c @ d) * d for c in frame.T if np.linalg.norm(c - (c @ d) * d) > 0.3)
    u /= np.linalg.norm(u)
    return np.stack([d, u, np.cross(d, u)], axis=1)


def _white_matter_share(tissue: _Tissue, box: tuple[slice, ...]) -> np.ndarray:
    """How much of each voxel a white-matter lesion may replace: 1 in white matter."""
    wm = tissue.fractions["wm"][box] / np.maximum(tissue.brain[box], 1e-6)
    return np.clip((wm - 0.15) / 0.5, 0.0, 1.0)


def _parenchyma_share(tissue: _Tissue, box: tuple[slice, ...]) -> np.ndarray:
    """How much a lesion may replace: parenchyma (GM + WM), not the CSF of sulci/ventricles."""
    f = tissue.fractions
    parenchyma = (f["gm"][box] + f["wm"][box]) / np.maximum(tissue.brain[box], 1e-6)
    return np.clip(2.0 * parenchyma - 0.2, 0.0, 1.0)


def _ellipsoid(
    coords, grid, anatomy, tissue, noise, *, centre, axes, frame, volume_ml, share, edge_mm
):
    """One ellipsoidal lesion of ``volume_ml``: its native box and fractions there.

    ``axes`` (mm) are the semi-axes along the columns of ``frame``; the outline is slightly
    lumpy (smooth ``noise``) and fitted to the volume over voxels that ``share`` allows.
    """
    box = _native_box(grid, anatomy, centre, 1.6 * float(axes.max()) + 2.0,
                      grid.max_displacement_mm)  # fmt: skip
    rel = _world(coords, anatomy, box) - centre.reshape(3, 1, 1, 1)
    local = np.einsum("mj,m...->j...", frame, rel)  # frame^T rel
    rho = np.sqrt(sum((local[k] / axes[k]) ** 2 for k in range(3))) * (1.0 + 0.08 * noise[box])
    phi = (rho - 1.0) * float(axes.min())
    allowed = share(tissue, box)
    eligible = (allowed >= 0.5) & (tissue.brain[box] >= 0.5)
    level = _fit_level(phi, eligible, _voxel_count(volume_ml, grid))
    return box, _ramp(level - phi, edge_mm) * allowed


def _ovoid_axes(rng: np.random.Generator, volume_ml: float, elongation: tuple[float, float]):
    """Semi-axes (long, short, short) of an ovoid of ``volume_ml`` and random elongation."""
    e = rng.uniform(*elongation)
    return _sphere_radius(volume_ml) * np.array([e ** (2 / 3), e ** (-1 / 3), e ** (-1 / 3)])


def _round(values) -> list:
    return [round(float(v), 2) for v in np.ravel(values)]


def _tumour(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params):
    """BraTS-like glioma: necrotic core in an enhancing rim in oedema that follows WM."""
    centre = anatomy.tumour_sites[rng.integers(len(anatomy.tumour_sites))]
    centre = centre + rng.uniform(-3, 3, 3)
    enhancing_ratio = rng.uniform(0.5, 0.7)
    necrosis_ratio = rng.uniform(0.55, 0.75)
    shape = rng.uniform(0.8, 1.2, 3)
    shape /= shape.prod() ** (1 / 3)
    irregularity = rng.uniform(0.10, 0.18)
    reach = 1.7 * _sphere_radius(volume_ml) + 5.0
    box = _native_box(grid, anatomy, centre, reach, grid.max_displacement_mm)
    rel = _world(coords, anatomy, box) - centre.reshape(3, 1, 1, 1)
    # radius in mm along a lumpy ellipsoid: the noise field makes the outline irregular
    rho = _ellipsoid_radius(rng, rel, shape) * (1.0 + irregularity * noise[box])
    brain = tissue.brain[box]
    not_wm = np.clip(1.0 - tissue.fractions["wm"][box] / np.maximum(brain, 1e-6), 0, 1)
    # oedema spreads along white matter: its outline shrinks where there is none
    rho_oedema = rho * (1.0 + 0.5 * not_wm)
    r_oedema = _fit_level(rho_oedema, brain >= 0.5, _voxel_count(volume_ml, grid))
    r_enh = r_oedema * enhancing_ratio
    r_nec = r_enh * necrosis_ratio
    q_nec = _ramp(r_nec - rho)
    q_enh = _ramp(r_enh - rho)
    q_out = np.maximum(_ramp(r_oedema - rho_oedema, edge_mm), q_enh)
    params.update(
        centre_mm=_round(centre),
        radius_mm={"oedema": round(r_oedema, 2), "enhancing": round(r_enh, 2),
                   "necrosis": round(r_nec, 2)},
    )  # fmt: skip
    return box, {"necrosis": q_nec, "enhancing": q_enh - q_nec, "oedema": q_out - q_enh}


def _periventricular(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params):
    """WMH caps (at the frontal and occipital horns) and bands along the lateral ventricles.

    The lesion is the white matter closest to the ventricles, with the distance shrunk at
    the horns so that the caps reach further than the bands, and modulated by a smooth
    noise field so that the outline is irregular; as the volume grows it becomes one
    confluent lesion that reaches into the deep white matter, as in Fazekas grade 3.
    Returns the fractions on the full grid and the lesion's reach (mm from the ventricles).
    """
    lo, hi = anatomy.ventricle_box
    margin = min(18.0 + 0.25 * volume_ml, 45.0)
    box = _native_box(grid, anatomy, (lo + hi) / 2, float(np.linalg.norm(hi - lo)) / 2 + margin,
                      grid.max_displacement_mm)  # fmt: skip
    tpl_voxel = coords[(slice(None), *box)]
    distance = _sample_blocks(anatomy.ventricle_distance, tpl_voxel)
    y = _world(coords, anatomy, box)[1]
    cap = rng.uniform(1.5, 3.0)
    horns = np.exp(-(((y - hi[1]) / 14.0) ** 2)) + np.exp(-(((y - lo[1]) / 14.0) ** 2))
    phi = distance / (1.0 + cap * horns) * np.clip(1.0 + 0.2 * noise[box], 0.5, None)
    allowed = _white_matter_share(tissue, box)
    eligible = (allowed >= 0.5) & (tissue.brain[box] >= 0.5)
    target = _voxel_count(volume_ml, grid)
    smallest = max(2.0, _voxel_count(0.01, grid))
    wanted = target
    for _ in range(6):  # later passes make up for the fragments that earlier ones dropped
        level = _fit_level(phi, eligible, wanted)
        q = _ramp(level - phi, edge_mm) * allowed
        # keep the parts that touch the ventricles' surroundings and are not specks
        parts, _ = ndimage.label(q >= 0.5)
        sizes = np.bincount(parts.ravel())
        touching = np.unique(parts[(parts > 0) & (distance <= 4.0)])
        touching = touching[sizes[touching] >= smallest]
        keep = np.isin(parts, touching)
        kept = float(keep.sum())
        q *= ndimage.binary_dilation(keep)
        if kept >= 0.95 * target:
            break
        wanted += max(target - kept, 0.25 * target)
    lesion = q >= 0.5
    reach = float(distance[lesion].max()) if lesion.any() else 0.0
    full = np.zeros(grid.shape, dtype=np.float32)
    full[box] = q
    params.update(cap_gain=round(float(cap), 3), periventricular_reach_mm=round(reach, 2))
    return full, reach


def _wmh(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params):
    """WMH-challenge-like load: periventricular caps/bands plus a few punctate deep lesions."""
    punctate_ml = rng.uniform(0.03, 0.15, int(rng.integers(2, 9)))
    punctate_ml = punctate_ml[np.cumsum(punctate_ml) <= 0.25 * volume_ml]
    if punctate_ml.size == 0:
        punctate_ml = np.array([0.03])
    q_all, reach = _periventricular(
        rng, coords, grid, anatomy, tissue, noise, volume_ml - punctate_ml.sum(), edge_mm, params
    )
    sites = anatomy.sites["deep_wm"]
    site_distance = _sample_blocks(anatomy.ventricle_distance, _template_voxel(anatomy, sites))
    chosen: list[tuple[np.ndarray, float]] = []
    for ml in punctate_ml:
        axes = _ovoid_axes(rng, ml, (1.0, 1.6))
        # beyond the periventricular lesion's reach: punctate lesions stay separate
        far = np.flatnonzero(site_distance >= max(reach, 10.0) + 4.0 + axes.max())
        for index in rng.choice(far, size=min(20, far.size), replace=False):
            centre = sites[index]
            if all(np.linalg.norm(centre - c) > axes.max() + r + 4.0 for c, r in chosen):
                break
        else:
            continue  # no room left in the deep white matter
        chosen.append((centre, float(axes.max())))
        box, q = _ellipsoid(
            coords, grid, anatomy, tissue, noise, centre=centre, axes=axes,
            frame=_frame(rng, None), volume_ml=ml, share=_white_matter_share, edge_mm=edge_mm,
        )  # fmt: skip
        q_all[box] = np.maximum(q_all[box], q)
    params.update(
        periventricular_ml=round(float(volume_ml - punctate_ml.sum()), 3),
        punctate_centres_mm=[_round(c) for c, _ in chosen],
    )
    return (slice(None),) * 3, {"wmh": q_all}


def _ms(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params):
    """MSLUB-like plaques: ovoids perpendicular to the ventricles, some juxtacortical."""
    n = int(rng.integers(6, 21))
    weights = rng.lognormal(0.0, 0.9, n)
    places = rng.choice(("periventricular", "juxtacortical", "deep"), size=n, p=(0.45, 0.2, 0.35))
    q_all = np.zeros(grid.shape, dtype=np.float32)
    lesions = []
    for ml, place in zip(volume_ml * weights / weights.sum(), places, strict=True):
        sites = anatomy.sites["deep_wm" if place == "deep" else f"{place}_wm"]
        centre = sites[rng.integers(len(sites))] + rng.uniform(-1.0, 1.0, 3)
        # Dawson's fingers: the long axis points away from the ventricles (along the
        # medullary veins); juxtacortical plaques point away from the cortex.
        field = anatomy.signed_distance if place == "juxtacortical" else anatomy.ventricle_distance
        direction = _uphill(anatomy, field, centre)
        axes = _ovoid_axes(rng, float(ml), (1.5, 2.5))
        if place == "periventricular":
            # the inner tip rests on the ventricle wall; the plaque reaches outwards
            wall = _sample_blocks(anatomy.ventricle_distance, _template_voxel(anatomy, centre))
            centre = centre + direction * max(0.0, 0.8 * axes[0] - float(wall[0]))
        box, q = _ellipsoid(
            coords, grid, anatomy, tissue, noise, centre=centre, axes=axes,
            frame=_frame(rng, direction), volume_ml=float(ml), share=_white_matter_share,
            edge_mm=edge_mm,
        )  # fmt: skip
        q_all[box] = np.maximum(q_all[box], q)
        lesions.append({"place": str(place), "centre_mm": _round(centre),
                        "axis": _round(direction), "volume_ml": round(float(ml), 3)})  # fmt: skip
    params.update(plaques=lesions)
    return (slice(None),) * 3, {"ms": q_all}


def _stroke(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params):
    """ATLAS-like chronic infarct: small subcortical ovoid, or a cortical-subcortical wedge."""
    if volume_ml < _SUBCORTICAL_STROKE_ML:
        sites = anatomy.sites["subcortical"]
        centre = sites[rng.integers(len(sites))]
        box, q = _ellipsoid(
            coords, grid, anatomy, tissue, noise, centre=centre,
            axes=_ovoid_axes(rng, volume_ml, (1.0, 2.0)), frame=_frame(rng, None),
            volume_ml=volume_ml, share=_parenchyma_share, edge_mm=edge_mm,
        )  # fmt: skip
        params.update(territory="subcortical", centre_mm=_round(centre))
        return box, {"stroke": q}
    cortex = anatomy.stroke_sites[rng.integers(len(anatomy.stroke_sites))]
    side = np.sign(cortex[0])
    deep = np.array([side * rng.uniform(14, 24), rng.uniform(-12, 6), rng.uniform(2, 14)])
    axis = cortex - deep
    length = float(np.linalg.norm(axis))
    axis /= length
    start = rng.uniform(0.15, 0.5) * length  # how deep the infarct reaches
    stop = length + 15.0  # beyond the cortex: the brain mask cuts it
    # the cone's opening for about the drawn volume (60 % of a frustum up to the surface is
    # parenchyma); the level fit below makes the volume exact
    frustum = math.pi / 3.0 * ((length + 5.0) ** 3 - start**3)
    opening = math.atan(math.sqrt(volume_ml * 1000.0 / (0.6 * frustum)))
    half_angle = float(np.clip(opening, np.deg2rad(8.0), np.deg2rad(50.0)))
    centre = deep + axis * (start + stop) / 2
    radius = math.hypot((stop - start) / 2, np.tan(half_angle) * stop) + 10.0
    box = _native_box(grid, anatomy, centre, radius, grid.max_displacement_mm)
    rel = _world(coords, anatomy, box) - deep.reshape(3, 1, 1, 1)
    along = np.einsum("j,j...->...", axis, rel)
    across = np.sqrt(np.maximum((rel**2).sum(0) - along**2, 0.0))
    width = np.tan(half_angle) * along * (1.0 + 0.2 * noise[box])
    phi = -np.minimum(np.minimum(width - across, along - start), stop - along)
    # a chronic infarct replaces parenchyma, not the CSF of sulci and ventricles
    allowed = _parenchyma_share(tissue, box)
    eligible = (allowed >= 0.5) & (tissue.brain[box] >= 0.5)
    level = _fit_level(phi, eligible, _voxel_count(volume_ml, grid))
    q = _ramp(level - phi, edge_mm) * allowed
    params.update(
        territory="cortical-subcortical",
        cortex_mm=_round(cortex),
        deep_mm=_round(deep),
        half_angle_deg=round(float(np.rad2deg(half_angle)), 2),
    )
    return box, {"stroke": q}


_LESION_MAKERS = {"tumour": _tumour, "wmh": _wmh, "ms": _ms, "stroke": _stroke}
_LESION_CLASSES = {
    "tumour": {"necrosis": 1, "oedema": 2, "enhancing": 3},
    "wmh": {"wmh": 1},
    "ms": {"ms": 1},
    "stroke": {"stroke": 1},
}


def _add_lesion(
    kind: str,
    rng: np.random.Generator,
    coords: np.ndarray,
    grid: _Grid,
    anatomy: _Anatomy,
    tissue: _Tissue,
    volume_ml: float,
    edge_mm: float,
    params: dict,
) -> np.ndarray:
    """Put lesion fractions into ``tissue`` (replacing healthy brain) and return seg labels."""
    seg = np.zeros(grid.shape, dtype=np.uint8)
    if kind == "none":
        return seg
    noise = _smooth_field(rng, grid.shape, grid.voxel_mm, 8.0)
    make = _LESION_MAKERS[kind]
    box, classes = make(rng, coords, grid, anatomy, tissue, noise, volume_ml, edge_mm, params)
    labels = _LESION_CLASSES[kind]
    brain = tissue.brain[box]
    total = np.clip(sum(classes.values()), 0.0, 1.0)
    if kind in ("tumour", "stroke"):
        # One lesion: drop the fragments that its irregular outline cut off.
        parts, n_parts = ndimage.label((total >= 0.5) & (brain >= 0.5))
        if n_parts > 1:
            largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
            keep = ndimage.binary_dilation(parts == largest)
            classes = {name: q * keep for name, q in classes.items()}
            total = total * keep
    # The lesion replaces brain tissue only: the CSF fraction also holds the rim outside the
    # brain, which a tumour reaching past the surface must leave in place.
    gm, wm, csf = (tissue.fractions[name][box] for name in ("gm", "wm", "csf"))
    csf_in_brain = np.clip(brain - gm - wm, 0.0, None)
    csf -= total * csf_in_brain
    gm *= 1.0 - total
    wm *= 1.0 - total
    for name, q in classes.items():
        full = np.zeros(grid.shape, dtype=np.float32)
        full[box] = q * brain
        tissue.fractions[name] = full
    names = list(classes)
    winner = np.argmax(np.stack([classes[n] for n in names]), axis=0)
    lesion_here = (total >= 0.5) & (brain >= 0.5)
    codes = np.array([labels[n] for n in names], dtype=np.uint8)
    seg[box] = np.where(lesion_here, codes[winner], 0)
    return seg


# --------------------------------------------------------------------------- head and brain


def _brain_and_head(
    rng: np.random.Generator, coords: np.ndarray, grid: _Grid, anatomy: _Anatomy,
    thickness: dict[str, float],
) -> _Tissue:  # fmt: skip
    tpl = anatomy.template
    # Padded 2 mm block grid index of each native voxel (block b centres 1 mm voxel 2b+0.5).
    block = [(coords[j] - 0.5) / 2.0 + _PAD_BLOCKS for j in range(3)]
    distance = ndimage.map_coordinates(
        anatomy.signed_distance, block, order=1, mode="nearest", output=np.float32
    )
    del block
    near = distance < 3.0
    points = coords[:, near]
    fractions: dict[str, np.ndarray] = {}
    for name, source in (("gm", tpl.gm), ("wm", tpl.wm), ("brain", tpl.brainmask)):
        full = np.zeros(grid.shape, dtype=np.float32)
        full[near] = ndimage.map_coordinates(
            source.astype(np.float32, copy=False), points, order=1, mode="constant", cval=0.0
        )
        fractions[name] = np.clip(full, 0.0, 1.0)
    brain = fractions.pop("brain")
    fractions["gm"] = np.minimum(fractions["gm"], brain)
    fractions["wm"] = np.minimum(fractions["wm"], brain - fractions["gm"])
    csf_brain = brain - fractions["gm"] - fractions["wm"]

    # Layers outside the brain, at distances scaled by a smooth field so they vary.
    wobble = np.clip(_smooth_field(rng, grid.shape, grid.voxel_mm, 40.0) / 2.0, -1.0, 1.0)
    d = distance / (1.0 + 0.2 * wobble)
    b1 = thickness["csf"]
    b2 = b1 + thickness["bone"]
    b3 = b2 + thickness["fat"]
    b4 = b3 + thickness["skin"]
    outside = 1.0 - brain
    s1, s2, s3, s4 = (_ramp(d - b) for b in (b1, b2, b3, b4))
    bone = outside * (s1 - s2)
    # diploe: a marrow band in the middle third of the skull
    marrow_share = 0.8 * np.clip(1.0 - np.abs(d - (b1 + b2) / 2) / ((b2 - b1) / 3), 0.0, 1.0)
    fractions["csf"] = csf_brain + outside * (1.0 - s1)
    fractions["bone"] = bone * (1.0 - marrow_share)
    fractions["marrow"] = bone * marrow_share
    fractions["fat"] = outside * (s2 - s3)
    fractions["skin"] = outside * (s3 - s4)
    return _Tissue(fractions=fractions, brain=brain)


def _tissue_labels(tissue: _Tissue) -> np.ndarray:
    """Dominant healthy tissue per voxel; air where no tissue reaches half a voxel."""
    f = tissue.fractions
    labels = np.zeros(tissue.brain.shape, dtype=np.uint8)
    best = np.full(tissue.brain.shape, 0.5, dtype=np.float32)
    for name in ("csf", "gm", "wm", "bone", "fat", "skin"):
        label = next(k for k, v in TISSUE_LABELS.items() if v == name)
        fraction = f["bone"] + f["marrow"] if name == "bone" else f[name]
        wins = fraction > best
        labels[wins] = label
        np.maximum(best, fraction, out=best)
    return labels


# --------------------------------------------------------------------------- public API


def generate_subject(
    *,
    seed: int,
    lesion: str = "none",
    sequences: Sequence[str] = SEQUENCES,
    voxel_size_range: tuple[float, float] = (1.2, 1.8),
    deformation_mm: float = 3.0,
    bias_strength: float = 0.3,
    noise_fraction: float = 0.03,
    lesion_volume_ml: Sequence[float] | None = None,
    lesion_edge_mm: float | None = None,
    lesion_volume_quantile: float | None = None,
) -> SyntheticSubject:
    """Generate one synthetic subject, fully determined by ``seed`` (see module docstring).

    Args:
        seed: non-negative integer; use :func:`subject_seed` to derive one per subject.
        lesion: one of ``LESION_KINDS``: ``"none"`` (healthy, all-zero seg), ``"tumour"``
            (BraTS-like glioma: necrotic core 1, oedema 2, enhancing rim 3), ``"wmh"``
            (WMH-challenge-like periventricular caps and bands plus punctate deep
            hyperintensities, label 1), ``"ms"`` (MSLUB-like ovoid plaques perpendicular to
            the ventricles, some juxtacortical, label 1) or ``"stroke"`` (ATLAS-like chronic
            infarct: a small subcortical ovoid or a cortical-subcortical wedge, label 1).
        sequences: which of ``SEQUENCES`` to synthesise.
        voxel_size_range: low and high voxel edge (mm), drawn independently per axis.
        deformation_mm: root-mean-square magnitude of the smooth non-linear displacement.
        bias_strength: the bias field is ``exp(bias_strength * b)`` with ``|b| <= 1``.
        noise_fraction: Rician noise sigma relative to the brightest brain-tissue mean.
        lesion_volume_ml: ``(q1, median, q3)`` in ml of the total lesion volume per
            subject; the volume is drawn from a split log-normal with these quartiles
            (:func:`brainuad.data.lesion_volumes.draw_lesion_volume`). None: the published
            values of the imitated dataset (``PUBLISHED_VOLUMES[lesion]``).
        lesion_edge_mm: width of the lesion's partial-volume edge; None: ``LESION_EDGE_MM``.
        lesion_volume_quantile: where in the volume distribution this subject lies, in
            (0, 1); the workflow stratifies a cohort with
            :func:`brainuad.data.lesion_volumes.cohort_quantiles`. None: an independent
            draw seeded by ``seed``.

    Returns:
        The subject: head images, lesion labels, brain mask, tissue labels and metadata.

    Raises:
        InputError: for an unknown lesion kind or sequence, or an out-of-range argument.
    """
    sequences = _check_args(
        seed, lesion, sequences, voxel_size_range, deformation_mm, bias_strength, noise_fraction
    )
    volume_ml = edge_mm = 0.0
    if lesion != "none":
        published = PUBLISHED_VOLUMES[lesion]
        quartiles = check_quartiles(
            published.quartiles if lesion_volume_ml is None else lesion_volume_ml,
            "lesion_volume_ml",
        )
        edge_mm = LESION_EDGE_MM[lesion] if lesion_edge_mm is None else float(lesion_edge_mm)
        if not 0.5 <= edge_mm <= 5.0:
            raise InputError(f"lesion_edge_mm: expected 0.5 to 5 mm, got {lesion_edge_mm!r}")
        bounds = (min(published.low_ml, quartiles[0]), max(published.high_ml, quartiles[2]))
        if lesion_volume_quantile is None:
            volume_rng = np.random.default_rng([int(seed), _STREAM_VOLUME])
            volume_ml = draw_lesion_volume(volume_rng, quartiles, bounds)
        else:
            volume_ml = lesion_volume_at(float(lesion_volume_quantile), quartiles, bounds)
    seed = int(seed)
    anatomy = _anatomy()
    params: dict = {}

    head_rng = np.random.default_rng([seed, _STREAM_HEAD])
    thickness = {
        "csf": head_rng.uniform(1.5, 3.0),
        "bone": head_rng.uniform(4.0, 7.0),
        "fat": head_rng.uniform(2.5, 5.0),
        "skin": head_rng.uniform(1.5, 2.5),
    }
    jitter = head_rng.uniform(0.96, 1.04, (len(SEQUENCES), len(_TISSUES)))
    head_mm = sum(thickness.values()) * 1.25 + _EDGE_MM

    geo_rng = np.random.default_rng([seed, _STREAM_GEOMETRY])
    grid = _make_grid(geo_rng, anatomy, voxel_size_range, head_mm, deformation_mm, params)
    coords = _template_coordinates(geo_rng, grid, anatomy, deformation_mm)

    tissue = _brain_and_head(head_rng, coords, grid, anatomy, thickness)
    tissue_labels = _tissue_labels(tissue)
    brainmask = (tissue.brain >= 0.5).astype(np.uint8)
    texture = ndimage.gaussian_filter(
        head_rng.standard_normal(grid.shape, dtype=np.float32), sigma=1.0 / grid.voxel_mm
    )
    texture /= max(float(texture.std()), 1e-6)

    lesion_rng = np.random.default_rng([seed, _STREAM_LESION])
    lesion_params: dict = {}
    if lesion != "none":
        lesion_params.update(drawn_volume_ml=round(volume_ml, 4), edge_mm=edge_mm)
    seg = _add_lesion(
        lesion, lesion_rng, coords, grid, anatomy, tissue, volume_ml, edge_mm, lesion_params
    )
    del coords

    images = {}
    gains = {}
    for name in sequences:
        index = SEQUENCES.index(name)
        seq_rng = np.random.default_rng([seed, _STREAM_SEQUENCE + index])
        means = {
            t: float(TISSUE_INTENSITY[name][t] * jitter[index, k]) for k, t in enumerate(_TISSUES)
        }
        clean = np.zeros(grid.shape, dtype=np.float32)
        textured = np.zeros(grid.shape, dtype=np.float32)
        scratch = np.empty(grid.shape, dtype=np.float32)
        for t, fraction in tissue.fractions.items():
            clean += np.multiply(fraction, means[t], out=scratch)
            textured += np.multiply(fraction, means[t] * _TEXTURE[t], out=scratch)
        del scratch
        clean += textured * texture
        del textured
        bias = _smooth_field(seq_rng, grid.shape, grid.voxel_mm, 80.0)
        bias /= max(float(np.abs(bias).max()), 1e-6)
        clean *= np.exp(bias_strength * bias)
        del bias
        sigma = noise_fraction * max(means["csf"], means["gm"], means["wm"])
        real = clean + sigma * seq_rng.standard_normal(grid.shape, dtype=np.float32)
        imag = sigma * seq_rng.standard_normal(grid.shape, dtype=np.float32)
        gain = float(seq_rng.uniform(500.0, 2000.0))
        gains[name] = round(gain, 3)
        images[name] = _nifti(np.hypot(real, imag) * gain, grid.affine, np.float32)

    voxel_ml = float(np.prod(grid.voxel_mm)) / 1000.0
    by_label = {
        str(label): round(float((seg == label).sum()) * voxel_ml, 4) for label in SEG_LABELS[lesion]
    }
    n_components = int(ndimage.label(seg > 0)[1]) if lesion != "none" else 0
    metadata = {
        "generator": "brainuad.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "template": "MNI ICBM152 2009a nonlinear symmetric (nilearn package data)",
        "seed": seed,
        "lesion": lesion,
        "seg_labels": {str(k): v for k, v in SEG_LABELS[lesion].items()},
        "sequences": list(sequences),
        "shape": list(grid.shape),
        "voxel_size_mm": [round(float(v), 4) for v in grid.voxel_mm],
        "orientation": "".join(nib.aff2axcodes(grid.affine)),
        "lesion_volume_ml": round(sum(by_label.values()), 4),
        "lesion_volume_ml_by_label": by_label,
        "lesion_components": n_components,
        "lesion_parameters": lesion_params,
        "brain_volume_ml": round(float(brainmask.sum()) * voxel_ml, 2),
        "head_layers_mm": {k: round(float(v), 3) for k, v in thickness.items()},
        **params,
        "deformation_mm": deformation_mm,
        "max_displacement_mm": round(grid.max_displacement_mm, 3),
        "bias_strength": bias_strength,
        "noise_fraction": noise_fraction,
        "intensity_gain": gains,
    }
    return SyntheticSubject(
        images=images,
        seg=_nifti(seg, grid.affine, np.uint8),
        brainmask=_nifti(brainmask, grid.affine, np.uint8),
        metadata=metadata,
        tissues=_nifti(tissue_labels, grid.affine, np.uint8),
    )


def _nifti(data: np.ndarray, affine: np.ndarray, dtype: type) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    return img
