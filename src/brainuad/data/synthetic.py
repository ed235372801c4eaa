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

from brainuad.data.template import MNITemplate, load_mni_template
from brainuad.errors import InputError

LESION_KINDS = ("none", "tumour", "wmh", "stroke")
SEQUENCES = ("t1", "t2", "flair")

#: Labels of ``SyntheticSubject.seg`` for each lesion kind (0 is healthy everywhere).
SEG_LABELS = {
    "none": {},
    "tumour": {1: "necrotic core", 2: "oedema", 3: "enhancing rim"},
    "wmh": {1: "white-matter hyperintensity"},
    "stroke": {1: "chronic infarct"},
}

#: Labels of ``SyntheticSubject.tissues``: the dominant healthy tissue of each voxel.
TISSUE_LABELS = {0: "air", 1: "csf", 2: "gm", 3: "wm", 4: "bone", 5: "fat", 6: "skin"}

_TISSUES = (
    "csf", "gm", "wm", "bone", "marrow", "fat", "skin",
    "necrosis", "oedema", "enhancing", "wmh", "stroke",
)  # fmt: skip

#: Mean signal of each tissue class per sequence, relative to white matter in T1.
#: T1: fat > WM > GM > CSF > bone; T2: CSF > GM > WM, bone dark; FLAIR: GM > WM, CSF dark,
#: lesions bright. Tumour core is T1-dark and T2-bright, WMH are slightly T1-dark,
#: a chronic infarct is CSF-like in T1 and bright-ish in T2 and FLAIR.
TISSUE_INTENSITY: dict[str, dict[str, float]] = {
    "t1": {
        "csf": 0.22, "gm": 0.62, "wm": 1.00, "bone": 0.05, "marrow": 0.75, "fat": 1.15,
        "skin": 0.45, "necrosis": 0.20, "oedema": 0.52, "enhancing": 0.78, "wmh": 0.80,
        "stroke": 0.28,
    },
    "t2": {
        "csf": 1.00, "gm": 0.52, "wm": 0.38, "bone": 0.04, "marrow": 0.45, "fat": 0.60,
        "skin": 0.30, "necrosis": 0.92, "oedema": 0.78, "enhancing": 0.60, "wmh": 0.72,
        "stroke": 0.85,
    },
    "flair": {
        "csf": 0.08, "gm": 0.58, "wm": 0.44, "bone": 0.04, "marrow": 0.55, "fat": 0.75,
        "skin": 0.32, "necrosis": 0.45, "oedema": 0.95, "enhancing": 0.80, "wmh": 0.92,
        "stroke": 0.68,
    },
}  # fmt: skip

# Relative texture amplitude per class: lesions and extracranial tissue are less uniform.
_TEXTURE = {
    "csf": 0.03, "gm": 0.05, "wm": 0.04, "bone": 0.15, "marrow": 0.15, "fat": 0.08,
    "skin": 0.08, "necrosis": 0.10, "oedema": 0.08, "enhancing": 0.12, "wmh": 0.05,
    "stroke": 0.08,
}  # fmt: skip

_GENERATOR_VERSION = 2  # 2: a lesion no longer removes the CSF rim outside the brain
_STREAM_GEOMETRY, _STREAM_HEAD, _STREAM_LESION, _STREAM_SEQUENCE = 0, 1, 2, 10
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
    tumour_sites: np.ndarray  # (n, 3) candidate centres, template world mm
    wmh_sites: np.ndarray
    stroke_sites: np.ndarray


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
    dist_vent = ndimage.distance_transform_edt(~vent) * 2.0
    lateral_mca = (np.abs(x) > 35) & (y > -45) & (y < 25) & (z > 0) & (z < 45)
    sites = {
        "tumour": (wm > 0.85) & (sdist < -15) & (np.abs(x) > 12) & (z > 0),
        "wmh": (wm > 0.8) & (dist_vent >= 2) & (dist_vent <= 12) & (sdist < -6),
        "stroke": (gm > 0.4) & (sdist > -6) & (sdist < 0) & lateral_mca,
    }
    centre = tpl.affine[:3, :3] @ np.argwhere(tpl.brainmask).mean(0) + tpl.affine[:3, 3]
    surface = world[:, (sdist > -2.0) & (sdist < 0.0)].T.astype(np.float64)
    found = {}
    for kind, mask in sites.items():
        if mask.sum() < 10:  # pragma: no cover - only with a different template
            raise InputError(f"MNI template: too few candidate {kind} sites ({mask.sum()})")
        found[kind] = world[:, mask].T.astype(np.float64)
    return _Anatomy(
        template=tpl,
        signed_distance=sdist,
        centre=centre,
        surface=surface,
        tumour_sites=found["tumour"],
        wmh_sites=found["wmh"],
        stroke_sites=found["stroke"],
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


def _ramp(z: np.ndarray) -> np.ndarray:
    """Partial-volume step: 0 for z < -EDGE/2, 1 for z > EDGE/2, linear in between (z in mm)."""
    return np.clip(z / _EDGE_MM + 0.5, 0.0, 1.0)


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


def _tumour(rng, coords, grid, anatomy, tissue, noise, radius_range, params):
    centre = anatomy.tumour_sites[rng.integers(len(anatomy.tumour_sites))]
    centre = centre + rng.uniform(-3, 3, 3)
    r_oedema = rng.uniform(*radius_range)
    r_enh = r_oedema * rng.uniform(0.5, 0.7)
    r_nec = r_enh * rng.uniform(0.55, 0.75)
    shape = rng.uniform(0.8, 1.2, 3)
    shape /= shape.prod() ** (1 / 3)
    irregularity = rng.uniform(0.10, 0.18)
    box = _native_box(grid, anatomy, centre, r_oedema * 1.4, grid.max_displacement_mm)
    rel = _world(coords, anatomy, box) - centre.reshape(3, 1, 1, 1)
    # radius in mm along a lumpy ellipsoid: the noise field makes the outline irregular
    rho = _ellipsoid_radius(rng, rel, shape) * (1.0 + irregularity * noise[box])
    brain = tissue.brain[box]
    not_wm = np.clip(1.0 - tissue.fractions["wm"][box] / np.maximum(brain, 1e-6), 0, 1)
    # oedema spreads along white matter: its outline shrinks where there is none
    rho_oedema = rho * (1.0 + 0.5 * not_wm)
    q_nec = _ramp(r_nec - rho)
    q_enh = _ramp(r_enh - rho)
    q_out = np.maximum(_ramp(r_oedema - rho_oedema), q_enh)
    params.update(
        centre_mm=[round(float(v), 2) for v in centre],
        radius_mm={"oedema": round(r_oedema, 2), "enhancing": round(r_enh, 2),
                   "necrosis": round(r_nec, 2)},
    )  # fmt: skip
    return box, {"necrosis": q_nec, "enhancing": q_enh - q_nec, "oedema": q_out - q_enh}


def _wmh(rng, coords, grid, anatomy, tissue, noise, count_range, params):
    sites = anatomy.wmh_sites
    n = int(rng.integers(count_range[0], count_range[1] + 1))
    chosen: list[np.ndarray] = []
    q_all = np.zeros(grid.shape, dtype=np.float32)
    radii = []
    for _ in range(200):
        if len(chosen) == n:
            break
        centre = sites[rng.integers(len(sites))] + rng.uniform(-1, 1, 3)
        axes = rng.uniform(2.0, 5.0, 3)
        if any(
            np.linalg.norm(centre - c) < axes.max() + r + 3.0
            for c, r in zip(chosen, radii, strict=True)
        ):
            continue  # keep them apart so each is its own component
        chosen.append(centre)
        radii.append(float(axes.max()))
        box = _native_box(grid, anatomy, centre, axes.max(), grid.max_displacement_mm)
        rel = _world(coords, anatomy, box) - centre.reshape(3, 1, 1, 1)
        rho = _ellipsoid_radius(rng, rel, axes) * (1.0 + 0.08 * noise[box])
        q = _ramp((1.0 - rho) * axes.min())
        q_all[box] = np.maximum(q_all[box], q)
    params.update(wmh_centres_mm=[[round(float(v), 2) for v in c] for c in chosen])
    box = (slice(None),) * 3
    return box, {"wmh": q_all}


def _stroke(rng, coords, grid, anatomy, tissue, noise, params):
    cortex = anatomy.stroke_sites[rng.integers(len(anatomy.stroke_sites))]
    side = np.sign(cortex[0])
    deep = np.array([side * rng.uniform(14, 24), rng.uniform(-12, 6), rng.uniform(2, 14)])
    axis = cortex - deep
    length = float(np.linalg.norm(axis))
    axis /= length
    start = rng.uniform(0.15, 0.5) * length  # how deep the infarct reaches
    stop = length + 15.0  # beyond the cortex: the brain mask cuts it
    half_angle = np.deg2rad(rng.uniform(12, 25))
    centre = deep + axis * (start + stop) / 2
    radius = math.hypot((stop - start) / 2, np.tan(half_angle) * stop)
    box = _native_box(grid, anatomy, centre, radius, grid.max_displacement_mm)
    rel = _world(coords, anatomy, box) - deep.reshape(3, 1, 1, 1)
    along = np.einsum("j,j...->...", axis, rel)
    across = np.sqrt(np.maximum((rel**2).sum(0) - along**2, 0.0))
    width = np.tan(half_angle) * along * (1.0 + 0.2 * noise[box])
    q = _ramp(np.minimum(np.minimum(width - across, along - start), stop - along))
    # a chronic infarct replaces parenchyma, not the CSF of sulci and ventricles
    brain = tissue.brain[box]
    parenchyma = (tissue.fractions["gm"][box] + tissue.fractions["wm"][box]) / np.maximum(
        brain, 1e-6
    )
    q = q * np.clip(2.0 * parenchyma - 0.2, 0.0, 1.0)
    params.update(
        cortex_mm=[round(float(v), 2) for v in cortex],
        deep_mm=[round(float(v), 2) for v in deep],
        half_angle_deg=round(float(np.rad2deg(half_angle)), 2),
    )
    return box, {"stroke": q}


def _add_lesion(
    kind: str,
    rng: np.random.Generator,
    coords: np.ndarray,
    grid: _Grid,
    anatomy: _Anatomy,
    tissue: _Tissue,
    tumour_radius_mm: tuple[float, float],
    wmh_count: tuple[int, int],
    params: dict,
) -> np.ndarray:
    """Put lesion fractions into ``tissue`` (replacing healthy brain) and return seg labels."""
    seg = np.zeros(grid.shape, dtype=np.uint8)
    if kind == "none":
        return seg
    noise = _smooth_field(rng, grid.shape, grid.voxel_mm, 8.0)
    if kind == "tumour":
        box, classes = _tumour(rng, coords, grid, anatomy, tissue, noise, tumour_radius_mm, params)
        labels = {"necrosis": 1, "oedema": 2, "enhancing": 3}
    elif kind == "wmh":
        box, classes = _wmh(rng, coords, grid, anatomy, tissue, noise, wmh_count, params)
        labels = {"wmh": 1}
    else:
        box, classes = _stroke(rng, coords, grid, anatomy, tissue, noise, params)
        labels = {"stroke": 1}
    brain = tissue.brain[box]
    total = np.clip(sum(classes.values()), 0.0, 1.0)
    if kind != "wmh":
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
    tumour_radius_mm: tuple[float, float] = (15.0, 25.0),
    wmh_count: tuple[int, int] = (5, 15),
) -> SyntheticSubject:
    """Generate one synthetic subject, fully determined by ``seed`` (see module docstring).

    Args:
        seed: non-negative integer; use :func:`subject_seed` to derive one per subject.
        lesion: one of ``LESION_KINDS``: ``"none"`` (healthy, all-zero seg), ``"tumour"``
            (BraTS-like: necrotic core 1, oedema 2, enhancing rim 3), ``"wmh"`` (5-15 small
            periventricular white-matter hyperintensities, label 1) or ``"stroke"``
            (ATLAS-like chronic cortical-subcortical infarct wedge, label 1).
        sequences: which of ``SEQUENCES`` to synthesise.
        voxel_size_range: low and high voxel edge (mm), drawn independently per axis.
        deformation_mm: root-mean-square magnitude of the smooth non-linear displacement.
        bias_strength: the bias field is ``exp(bias_strength * b)`` with ``|b| <= 1``.
        noise_fraction: Rician noise sigma relative to the brightest brain-tissue mean.
        tumour_radius_mm: range of the outer (oedema) radius of a tumour.
        wmh_count: inclusive range of the number of hyperintensities for ``"wmh"``.

    Returns:
        The subject: head images, lesion labels, brain mask, tissue labels and metadata.

    Raises:
        InputError: for an unknown lesion kind or sequence, or an out-of-range argument.
    """
    sequences = _check_args(
        seed, lesion, sequences, voxel_size_range, deformation_mm, bias_strength, noise_fraction
    )
    if not 2.0 <= tumour_radius_mm[0] <= tumour_radius_mm[1] <= 40.0:
        raise InputError(
            f"tumour_radius_mm: expected 2 <= low <= high <= 40, got {tumour_radius_mm!r}"
        )
    if not 1 <= wmh_count[0] <= wmh_count[1] <= 40:
        raise InputError(f"wmh_count: expected 1 <= low <= high <= 40, got {wmh_count!r}")
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
    seg = _add_lesion(
        lesion, lesion_rng, coords, grid, anatomy, tissue, tumour_radius_mm, wmh_count,
        lesion_params,
    )  # fmt: skip
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
        "generator_version": _GENERATOR_VERSION,
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
