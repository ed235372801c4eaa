"""The cDDPM reference preprocessing as a named pipeline (``preprocess.pipeline: cddpm``).

Behrendt et al. (arXiv 2312.04215) preprocess with the scripts of
FinnBehrendt/Conditioned-Diffusion-Models-UAD (the same in patched-Diffusion-Models-UAD):
``preprocessing/prepare_IXI.sh`` and its siblings, then the loader of
``src/datamodules/create_dataset.py``. Built here from the steps the default pipeline uses,
in the reference's order and with its settings:

1. ``resample``: every sequence to ``resolution_mm`` (1 mm) with B-spline interpolation
   (``resample.py``: ``ants.resample_image(..., interp_type=4)``);
2. ``skullstrip``: the reference runs HD-BET on the T2. Here HD-BET on the T2 (the dataset's
   T2 where it has one) when ``hdbet_weights`` is given, else ``skullstrip_method`` (deepbet
   by default, a T1 network, so on ``reference_sequence``) or ``none`` for stripped
   downloads; the method and the stripped sequence are recorded;
3. ``register``: the stripped brain affinely to the template brain (``registration.py``:
   SRI24 ``T1_brain.nii`` reoriented to ITK's RAI, i.e. LPS voxel axes; here
   ``preprocess.template`` when given, else MNI152, recorded), every stripped sequence and
   the brain mask moved with linear interpolation onto the template's grid, the lesion
   labels linearly too and kept where above 0 (:mod:`brainuad.preprocess.labels`);
4. ``cut``: to the brain box of the moved mask (``cut.py``, its last plane excluded);
5. ``n4``: N4 on each cut volume with 4 x 200 iterations, tolerance 5e-4, shrink 4, the
   B-spline distance 200 mm and the fitting mask ``ants.get_mask`` of ANTsPy 0.3 (the
   reference's pinned version, whose defaults these are), weighted by the brain mask
   smoothed with a 1 mm Gaussian (``n4filter.py``);

and then what the reference's loader does to every volume before its x2 downsampling:

6. ``curvature_flow``: SimpleITK ``CurvatureFlow`` (time step 0.125, 3 iterations) on the
   images (:mod:`brainuad.preprocess.smooth`);
7. ``crop``: torchio's ``CropOrPad(crop_shape)`` (192 x 192 x 100) about the volume centre;
8. ``normalise``: torchio's ``RescaleIntensity((0, 1), percentiles=(1, 99))`` with the brain
   mask: the 1st and 99th brain percentiles become 0 and 1, the whole volume clipped to
   [0, 1] (voxels outside the mask keep their value);
9. ``write`` and ``qc`` as in the default pipeline.

The volumes written are thus the reference loader's volumes before downsampling, on the
template's LPS voxel axes. The differences that remain are listed in ``docs/methods.md``,
"Deviations from the reference preprocessing".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np

from brainuad.errors import InputError
from brainuad.evaluation.metrics import dice
from brainuad.io.nifti import load_nifti, save_nifti
from brainuad.preprocess.ants_bridge import ants_affine, nifti_to_ants
from brainuad.preprocess.bias import n4_correct
from brainuad.preprocess.crop import centred_box_centre, crop_or_pad, reference_brain_box
from brainuad.preprocess.labels import linear_positive_labels
from brainuad.preprocess.normalise import percentile_normalise
from brainuad.preprocess.orientation import reorient_to_lps, reorient_to_ras
from brainuad.preprocess.pipeline import (
    _load_checked,
    _StepTimer,
    subject_brain_mask,
)
from brainuad.preprocess.qc import write_qc_png
from brainuad.preprocess.register import ants_random_seed, identity
from brainuad.preprocess.register import register as register_images
from brainuad.preprocess.resample import resample_to_isotropic
from brainuad.preprocess.skullstrip import SKULLSTRIP_METHODS
from brainuad.preprocess.skullstrip_hdbet import check_hdbet
from brainuad.preprocess.smooth import CURVATURE_FLOW_ITERATIONS, CURVATURE_FLOW_TIME_STEP
from brainuad.preprocess.smooth import curvature_flow as curvature_flow_filter
from brainuad.provenance import seed_everything

#: The reference's steps, in its order (the record's ``steps_run`` lists those that ran).
CDDPM_STEP_ORDER = (
    "resample",
    "skullstrip",
    "register",
    "cut",
    "n4",
    "curvature_flow",
    "crop",
    "normalise",
    "write",
    "qc",
)

#: N4 as ``preprocessing/n4filter.py`` ran it under antspyx 0.3.x (``spline_param=200``,
#: fitting mask ``get_mask(image)`` by default), weight mask smoothed with sigma 1 mm.
N4_TOLERANCE = 5e-4
N4_SPLINE_DISTANCE_MM = 200.0
N4_WEIGHT_SMOOTHING_MM = 1.0


def choose_skullstrip(
    skullstrip_method: str,
    hdbet_weights: str | None,
    sequences: list[str],
    reference_sequence: str,
) -> tuple[str, str, str]:
    """(method, stripped sequence, why) of the cddpm pipeline's skull-stripping.

    HD-BET on the T2 (the reference's choice) when its weights are given; otherwise the
    configured method (deepbet, a T1 network, on ``reference_sequence``); ``none`` (a
    stripped download) always wins.
    """
    if skullstrip_method == "none":
        return "none", reference_sequence, "download stripped already"
    if hdbet_weights:
        sequence = "t2" if "t2" in sequences else reference_sequence
        return "hdbet", sequence, "as the reference: HD-BET weights given"
    return (
        skullstrip_method,
        reference_sequence,
        "no HD-BET weights (preprocess.hdbet_weights): the configured method instead",
    )


def preprocess_subject_cddpm(
    *,
    images: dict[str, Path],
    seg: Path | None,
    truth_brainmask: Path | None,
    template_t1: Path,
    template_brainmask: Path,
    out_images: dict[str, Path],
    out_brainmask: Path,
    out_seg: Path,
    out_qc_png: Path,
    reference_sequence: str = "t1",
    resolution_mm: float = 1.0,
    n4_shrink_factor: int = 4,
    n4_iterations: tuple[int, ...] = (200, 200, 200, 200),
    registration_type: str = "Affine",
    skullstrip_method: str = "deepbet",
    deepbet_threshold: float = 0.5,
    normalise_percentiles: tuple[float, float] = (1.0, 99.0),
    crop_shape: tuple[int, int, int] = (192, 192, 100),
    register: bool = True,
    coregister_sequences: bool = False,
    hdbet_weights: str | None = None,
    seed: int = 0,
    n4: bool = True,
    curvature_flow: bool = True,
) -> dict[str, Any]:
    """Preprocess one subject as the cDDPM reference does (module docstring).

    Arguments as :func:`brainuad.preprocess.pipeline.preprocess_subject`, except:
    ``crop_shape`` is the load-time box of the reference (192 x 192 x 100, about the centre
    of the brain-box cut), ``n4_iterations`` default to the reference's 4 x 200, and
    ``curvature_flow=False`` leaves the smoothing out (for tests of the other steps).

    Returns:
        The QC record, with ``pipeline: "cddpm"``, ``steps_run`` (the steps in the order
        they ran), the skull-stripping choice, the template, and every step's settings.

    Raises:
        InputError: naming the file, as the default pipeline.
    """
    if reference_sequence not in images:
        raise InputError(
            f"reference_sequence: '{reference_sequence}' is not one of the images {sorted(images)}"
        )
    if set(out_images) != set(images):
        raise InputError(
            f"out_images: keys {sorted(out_images)} differ from images {sorted(images)}"
        )
    if skullstrip_method not in SKULLSTRIP_METHODS:
        raise InputError(
            f"skullstrip_method: '{skullstrip_method}' is not one of {SKULLSTRIP_METHODS}"
        )
    strip_method, strip_sequence, strip_reason = choose_skullstrip(
        skullstrip_method, hdbet_weights, list(images), reference_sequence
    )
    if strip_method == "hdbet":
        check_hdbet(hdbet_weights)
    timer = _StepTimer()
    reference_path = Path(images[strip_sequence])
    seed_everything(seed)
    random_seed = ants_random_seed(seed)

    with timer.step("load"):
        reference = load_nifti(reference_path)
        other_paths = {k: Path(v) for k, v in images.items() if k != strip_sequence}
        others = (
            {k: load_nifti(v) for k, v in other_paths.items()}
            if coregister_sequences
            else _load_checked(other_paths, reference_path, reference)
        )
        raw = {k: reorient_to_ras(reference if k == strip_sequence else others[k]) for k in images}
        labels_raw = {
            k: reorient_to_ras(v)
            for k, v in _load_checked(
                {k: Path(v) for k, v in (("seg", seg), ("truth", truth_brainmask)) if v},
                reference_path,
                reference,
            ).items()
        }
        template_img = reorient_to_lps(load_nifti(template_t1))
        template_mask_img = reorient_to_lps(load_nifti(template_brainmask))

    with timer.step("resample"):
        heads = {
            k: resample_to_isotropic(nifti_to_ants(v), resolution_mm, "bspline")
            for k, v in raw.items()
        }
        template = resample_to_isotropic(nifti_to_ants(template_img), resolution_mm, "bspline")
        template_mask = resample_to_isotropic(
            nifti_to_ants(template_mask_img), resolution_mm, "nearest"
        )
        template_brain = template * template_mask

    with timer.step("skullstrip"):
        mask = subject_brain_mask(
            raw[strip_sequence],
            heads[strip_sequence],
            method=strip_method,
            template=template,
            template_mask=template_mask,
            deepbet_threshold=deepbet_threshold,
            registration_type=registration_type,
            hdbet_weights=hdbet_weights,
            random_seed=random_seed,
            where=reference_path,
        )
        subject_mask = heads[strip_sequence].new_image_like(mask.astype(np.float32))
        if coregister_sequences:
            for name in heads:
                if name != strip_sequence:
                    with register_images(
                        heads[strip_sequence], heads[name], type_of_transform="Rigid"
                    ) as reg:
                        heads[name] = reg.to_fixed(heads[name], "linear")
        brains = {k: v * subject_mask for k, v in heads.items()}

    with timer.step("register"):
        aligner = (
            register_images(
                template_brain,
                brains[strip_sequence],
                type_of_transform=registration_type,
                random_seed=random_seed,
            )
            if register
            else identity(template_brain, brains[strip_sequence])
        )
        with aligner as reg:
            moved = {k: reg.to_fixed(v, "linear").numpy() for k, v in brains.items()}
            # The reference keeps the linearly moved mask as it is (fractions at the edge);
            # everything above 0 is brain, and the fractions weight N4.
            mask_weights = reg.to_fixed(subject_mask, "linear").numpy()
            moved_labels = {}
            for name, image in labels_raw.items():
                source = nifti_to_ants(image)

                def move_linear(volume: np.ndarray, source=source, reg=reg) -> np.ndarray:
                    return reg.to_fixed(source.new_image_like(volume), "linear").numpy()

                moved_labels[name] = linear_positive_labels(
                    np.rint(np.asanyarray(image.dataobj)).astype(np.int64), move_linear
                )
    grid_affine = ants_affine(template)
    if not (mask_weights > 0).any():
        raise InputError(
            f"{reference_path}: brain mask is empty after registration to {template_t1}"
        )

    with timer.step("cut"):
        box = reference_brain_box(mask_weights > 0)
        start = np.array([s.start for s in box])
        cut_affine = grid_affine.copy()
        cut_affine[:3, 3] = grid_affine[:3, :3] @ start + grid_affine[:3, 3]
        moved = {k: v[box] for k, v in moved.items()}
        mask_weights = mask_weights[box]
        moved_labels = {k: v[box] for k, v in moved_labels.items()}

    n4_settings = {
        "shrink_factor": n4_shrink_factor,
        "iterations": list(n4_iterations),
        "tolerance": N4_TOLERANCE,
        "spline_distance_mm": N4_SPLINE_DISTANCE_MM,
        "fit_mask": "ants.get_mask(image)",
        "weight_mask": f"brain mask smoothed, sigma {N4_WEIGHT_SMOOTHING_MM} mm",
    }
    if n4:
        with timer.step("n4"):
            weights = ants.smooth_image(
                nifti_to_ants(nib.Nifti1Image(mask_weights.astype(np.float32), cut_affine)),
                N4_WEIGHT_SMOOTHING_MM,
            )
            for name, volume in moved.items():
                image = nifti_to_ants(nib.Nifti1Image(volume.astype(np.float32), cut_affine))
                try:
                    moved[name] = n4_correct(
                        image,
                        shrink_factor=n4_shrink_factor,
                        iterations=tuple(n4_iterations),
                        mask=ants.get_mask(image),
                        tolerance=N4_TOLERANCE,
                        spline_distance_mm=N4_SPLINE_DISTANCE_MM,
                        weight_mask=weights,
                    ).numpy()
                except (ValueError, RuntimeError) as err:
                    raise InputError(f"{images[name]}: bias correction failed: {err}") from err

    if curvature_flow:
        spacing = np.linalg.norm(cut_affine[:3, :3], axis=0)
        with timer.step("curvature_flow"):
            moved = {
                k: curvature_flow_filter(
                    v,
                    spacing,
                    time_step=CURVATURE_FLOW_TIME_STEP,
                    iterations=CURVATURE_FLOW_ITERATIONS,
                )
                for k, v in moved.items()
            }

    with timer.step("crop"):
        centre = centred_box_centre(mask_weights.shape, crop_shape)
        out_mask, affine = crop_or_pad(mask_weights > 0, cut_affine, crop_shape, centre)
        moved = {k: crop_or_pad(v, cut_affine, crop_shape, centre)[0] for k, v in moved.items()}
        moved_labels = {
            k: crop_or_pad(v, cut_affine, crop_shape, centre)[0] for k, v in moved_labels.items()
        }
    if not out_mask.any():
        raise InputError(f"{reference_path}: brain mask is empty in the crop {crop_shape}")

    with timer.step("normalise"):
        normalised, bounds = {}, {}
        for name, volume in moved.items():
            try:
                normalised[name], low, high = percentile_normalise(
                    volume, out_mask, normalise_percentiles, zero_outside=False
                )
            except ValueError as err:
                raise InputError(f"{images[name]}: {err}") from err
            bounds[name] = {"low": round(low, 4), "high": round(high, 4)}

    seg_out = moved_labels.get("seg", np.zeros(out_mask.shape, dtype=np.uint8))
    with timer.step("write"):
        for name, volume in normalised.items():
            save_nifti(volume, affine, out_images[name], dtype=np.float32)
        save_nifti(out_mask, affine, out_brainmask, dtype=np.uint8)
        save_nifti(seg_out, affine, out_seg, dtype=np.uint8)

    record: dict[str, Any] = {}
    with timer.step("qc"):
        if "truth" in moved_labels:
            record["brainmask_dice_vs_truth"] = round(dice(out_mask, moved_labels["truth"] > 0), 4)

        def ras(volume: np.ndarray) -> np.ndarray:
            return np.asanyarray(reorient_to_ras(nib.Nifti1Image(volume, affine)).dataobj)

        write_qc_png(
            out_qc_png,
            {k: ras(v) for k, v in normalised.items()},
            ras(out_mask.astype(np.uint8)),
            ras(seg_out),
            title=f"{reference_path.name}  cddpm  strip={strip_method}  {resolution_mm} mm",
        )

    record.update(
        {
            "pipeline": "cddpm",
            "reference_image": str(reference_path),
            "skullstrip_method": strip_method,
            "skullstrip_sequence": strip_sequence,
            "skullstrip_choice": strip_reason,
            "template": str(template_t1),
            "brain_volume_ml": round(float(mask.sum()) * resolution_mm**3 / 1000.0, 2),
            "lesion_voxels": int((seg_out > 0).sum()),
            "lesion_voxels_outside_brainmask": int(((seg_out > 0) & ~out_mask).sum()),
            "brain_box_shape": [int(s.stop - s.start) for s in box],
            "output_grid": {
                "space": "template LPS+ (ITK RAI), cut to the brain box, centre-cropped",
                "resolution_mm": resolution_mm,
                "shape": [int(s) for s in out_mask.shape],
                "affine": np.round(affine, 6).tolist(),
            },
            "normalisation_bounds": bounds,
            "step_order": list(CDDPM_STEP_ORDER),
            "steps_run": [s for s in timer.seconds if s != "load"],
            "runtimes_s": timer.seconds,
            "settings": {
                "reference_sequence": reference_sequence,
                "resample_interpolation": "bspline",
                "registration_type": registration_type if register else None,
                "coregister_sequences": coregister_sequences,
                "label_interpolation": "linear, then > 0",
                "n4": n4_settings if n4 else None,
                "curvature_flow": (
                    {"time_step": CURVATURE_FLOW_TIME_STEP, "iterations": CURVATURE_FLOW_ITERATIONS}
                    if curvature_flow
                    else None
                ),
                "crop_shape": list(crop_shape),
                "normalise_percentiles": list(normalise_percentiles),
                "normalise_outside_mask": "kept (torchio RescaleIntensity)",
                "seed": seed,
                "ants_random_seed": random_seed,
                "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default"),
            },
        }
    )
    return record
