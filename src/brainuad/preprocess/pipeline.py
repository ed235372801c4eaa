"""Per-subject preprocessing: from raw heads to stripped, registered, normalised volumes.

Order, and why:

1. reorient every volume to RAS (exact; deepbet and the QC picture expect RAS axes);
2. resample the images to ``resolution_mm`` isotropic in subject space (B-spline), so N4's
   shrink factor and the stripping see the same voxel size whatever the scanner's; label
   volumes are not resampled here (only a nearest-neighbour copy of the true brain mask,
   for the subject-space QC Dice);
3. N4 on each head, fitted inside an Otsu head mask: both stripping methods work better on
   flat intensities, and the field is smooth enough to fit across the whole head;
   with ``coregister_sequences`` (IXI, whose T1 and T2 were acquired on different grids),
   each other sequence is then rigidly registered onto the reference's grid;
4. skull-strip the reference sequence (all sequences share its grid, so one mask serves all);
   ``none`` for downloads stripped already (BraTS): the brain is the non-zero voxels;
5. register the stripped reference brain to the template *brain* (as the references do):
   with the skull gone, the metric matches like with like, which a head-to-brain
   registration cannot; then every volume goes through the same transform, straight onto
   the output grid (one interpolation, no separate crop of the data). The transform acts
   in physical space, so the lesion labels go from their own (reoriented) grid to the
   output grid in a single ``genericLabel`` step. With ``register=False`` (downloads in the
   template's space already, e.g. ATLAS in MNI152) the transform is the identity: the
   volumes are only resampled onto the output grid;
6. normalise each sequence to [0, 1] by percentiles inside the registered brain mask;
7. the output grid is the template resampled to ``resolution_mm`` and cropped/padded to
   ``crop_shape`` around the centre of the template brain's bounding box, so every subject
   of every dataset shares it;
8. QC picture and record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np

from brainuad.errors import InputError
from brainuad.evaluation.metrics import dice
from brainuad.io.nifti import check_same_grid, load_nifti, save_nifti
from brainuad.preprocess.ants_bridge import ants_affine, nifti_to_ants
from brainuad.preprocess.bias import n4_correct
from brainuad.preprocess.crop import brain_box_centre, crop_or_pad
from brainuad.preprocess.normalise import percentile_normalise
from brainuad.preprocess.orientation import reorient_to_ras
from brainuad.preprocess.qc import write_qc_png
from brainuad.preprocess.register import ants_random_seed, identity
from brainuad.preprocess.register import register as register_images
from brainuad.preprocess.resample import resample_to_isotropic
from brainuad.preprocess.skullstrip import SKULLSTRIP_METHODS, skull_strip
from brainuad.preprocess.skullstrip_deepbet import DEEPBET_GRIDS
from brainuad.preprocess.skullstrip_hdbet import check_hdbet
from brainuad.provenance import seed_everything

STEP_ORDER = (
    "reorient",
    "resample",
    "n4",
    "skullstrip",
    "register",
    "normalise",
    "write",
    "qc",
)


class _StepTimer:
    """Collects wall-clock seconds per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def output_grid(
    template_t1: ants.ANTsImage,
    template_brainmask: ants.ANTsImage,
    crop_shape: tuple[int, int, int],
) -> ants.ANTsImage:
    """The shared output grid: ``template_t1``'s grid cut to ``crop_shape`` around the
    centre of the template brain's bounding box (values are the template brain)."""
    mask = template_brainmask.numpy() > 0.5
    brain = template_t1.numpy() * mask
    box, affine = crop_or_pad(brain, ants_affine(template_t1), crop_shape, brain_box_centre(mask))
    return nifti_to_ants(nib.Nifti1Image(box, affine))


def _load_checked(
    paths: dict[str, Path], reference_path: Path, reference: nib.Nifti1Image
) -> dict[str, nib.Nifti1Image]:
    loaded = {}
    for name, path in paths.items():
        image = load_nifti(path)
        check_same_grid(reference_path, reference, path, image)
        loaded[name] = image
    return loaded


def _as_mask(image: ants.ANTsImage) -> np.ndarray:
    return image.numpy() > 0.5


def subject_brain_mask(
    raw: nib.Nifti1Image,
    head: ants.ANTsImage,
    *,
    method: str,
    template: ants.ANTsImage,
    template_mask: ants.ANTsImage,
    deepbet_threshold: float,
    registration_type: str,
    hdbet_weights: str | os.PathLike | None,
    random_seed: int,
    where: str | os.PathLike,
) -> np.ndarray:
    """Boolean brain mask on the grid of ``head`` (the resampled image of ``raw``).

    ``method`` ``"none"`` is a skull-stripped download: the brain is where ``raw`` is
    non-zero, taken on the raw grid (B-spline resampling rings into the zero background);
    otherwise :func:`skull_strip` runs on ``head``. Raises InputError naming ``where`` when
    stripping fails or leaves an empty mask.
    """
    try:
        if method == "none":
            raw_brain = nifti_to_ants(
                nib.Nifti1Image((np.asanyarray(raw.dataobj) != 0).astype(np.float32), raw.affine)
            )
            mask = _as_mask(
                ants.resample_image_to_target(raw_brain, head, interp_type="nearestNeighbor")
            )
        else:
            mask = skull_strip(
                head,
                method=method,  # type: ignore[arg-type]
                template_t1=template,
                template_brainmask=template_mask,
                deepbet_threshold=deepbet_threshold,
                registration_type=registration_type,
                hdbet_weights=hdbet_weights,
                random_seed=random_seed,
            )
    except ValueError as err:
        raise InputError(f"{where}: skull-stripping failed: {err}") from err
    if not mask.any():
        raise InputError(f"{where}: brain mask is empty after skull-stripping (method {method})")
    return mask


def preprocess_subject(
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
    n4_iterations: tuple[int, ...] = (50, 50, 30, 20),
    registration_type: str = "Affine",
    skullstrip_method: str = "deepbet",
    deepbet_threshold: float = 0.5,
    normalise_percentiles: tuple[float, float] = (1.0, 99.0),
    crop_shape: tuple[int, int, int] = (160, 192, 160),
    register: bool = True,
    coregister_sequences: bool = False,
    hdbet_weights: str | None = None,
    seed: int = 0,
    n4: bool = True,
    pipeline: str = "default",
) -> dict[str, Any]:
    """Preprocess one subject's sequences onto the shared template grid.

    Args:
        images: sequence name -> head volume; all on the grid of ``reference_sequence``.
        seg: lesion labels on the same grid, or None for a healthy subject (an all-zero seg
            is written).
        truth_brainmask: ground-truth brain mask on the same grid, or None; only used for QC.
        template_t1: template T1 (MNI152); a brain, or a head with ``template_brainmask``.
        template_brainmask: brain mask of the template, on ``template_t1``'s grid.
        out_images: sequence name -> output path, same keys as ``images``.
        out_brainmask, out_seg, out_qc_png: output paths.
        reference_sequence: the sequence stripped and registered (a T1 for deepbet).
        resolution_mm: isotropic voxel edge of the output (and of the intermediate steps).
        n4_shrink_factor, n4_iterations: N4 settings (the references use 4 x 200 iterations).
        registration_type: ``ants.registration`` type to the template ("Affine" by default).
        skullstrip_method: "deepbet", "hdbet" (needs ``hdbet_weights``), "template", or
            "none" (already stripped: the brain is the reference's non-zero voxels).
        deepbet_threshold: brain probability threshold of deepbet.
        normalise_percentiles: brain percentiles mapped to 0 and 1.
        crop_shape: output box in voxels of ``resolution_mm``, centred on the template brain.
        register: False when the images are in the template's space already (identity).
        coregister_sequences: rigidly register each sequence onto the reference sequence
            (their grids may then differ; the labels must be on the reference's grid).
        hdbet_weights: folder of the HD-BET model files, for ``skullstrip_method="hdbet"``.
        n4: False for a download that is bias-corrected already (cddpm_release): the
            N4 step is skipped.
        pipeline: ``default`` (this function) or ``cddpm``: the cDDPM reference's steps and
            order (:func:`brainuad.preprocess.cddpm.preprocess_subject_cddpm`, which gets
            every other argument).
        seed: the study seed; seeds Python, NumPy and torch (deepbet) and, through
            :func:`~brainuad.preprocess.register.ants_random_seed`, every ANTs registration
            (ANTs seeds 0 from the clock, which made two runs differ).

    Threads are not set here: ITK and torch read the process-wide settings of the caller
    (the workflow's ``brainuad.workflow.rule_logging`` caps them at the rule's ``threads``).
    Outputs are bit-identical between runs with one ITK thread
    (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, the workflow's setting; docs/reliability.md).

    Returns:
        The QC record (JSON-ready): Dice of the stripped mask vs ``truth_brainmask`` (in
        output space and in resampled subject space), Dice of the registered brain mask vs
        the template brain mask, output grid, normalisation bounds and per-step seconds.

    Raises:
        InputError: naming the file, when a NIfTI is unreadable, a volume's shape or affine
            differs from the reference sequence, or the brain mask is empty after stripping.
    """
    if pipeline == "cddpm":
        arguments = {k: v for k, v in locals().items() if k != "pipeline"}
        from brainuad.preprocess.cddpm import preprocess_subject_cddpm

        return preprocess_subject_cddpm(**arguments)
    if pipeline != "default":
        raise InputError(f"preprocess.pipeline: '{pipeline}' is not one of ['default', 'cddpm']")
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
    if skullstrip_method == "hdbet":
        check_hdbet(hdbet_weights)
    timer = _StepTimer()
    reference_path = Path(images[reference_sequence])
    seed_everything(seed)
    random_seed = ants_random_seed(seed)

    with timer.step("load"):
        reference = load_nifti(reference_path)
        other_paths = {k: Path(v) for k, v in images.items() if k != reference_sequence}
        others = (
            {k: load_nifti(v) for k, v in other_paths.items()}
            if coregister_sequences
            else _load_checked(other_paths, reference_path, reference)
        )
        raw = {k: reference if k == reference_sequence else others[k] for k in images}
        labels_raw = _load_checked(
            {k: Path(v) for k, v in (("seg", seg), ("truth", truth_brainmask)) if v},
            reference_path,
            reference,
        )
        template_t1_img = load_nifti(template_t1)
        template_mask_img = load_nifti(template_brainmask)
        check_same_grid(template_t1, template_t1_img, template_brainmask, template_mask_img)

    with timer.step("reorient"):
        raw = {k: reorient_to_ras(v) for k, v in raw.items()}
        labels_raw = {k: reorient_to_ras(v) for k, v in labels_raw.items()}
        template_t1_img = reorient_to_ras(template_t1_img)
        template_mask_img = reorient_to_ras(template_mask_img)

    with timer.step("resample"):
        heads = {
            k: resample_to_isotropic(nifti_to_ants(v), resolution_mm, "bspline")
            for k, v in raw.items()
        }
        truth_subject = (
            resample_to_isotropic(nifti_to_ants(labels_raw["truth"]), resolution_mm, "nearest")
            if "truth" in labels_raw
            else None
        )
        template = resample_to_isotropic(nifti_to_ants(template_t1_img), resolution_mm, "bspline")
        template_mask = resample_to_isotropic(
            nifti_to_ants(template_mask_img), resolution_mm, "nearest"
        )
        template_brain = template * template_mask
        grid = output_grid(template, template_mask, crop_shape)

    with timer.step("n4"):
        for name, head in heads.items() if n4 else ():
            try:
                heads[name] = n4_correct(
                    head, shrink_factor=n4_shrink_factor, iterations=n4_iterations
                )
            except ValueError as err:
                raise InputError(f"{images[name]}: bias correction failed: {err}") from err

    if coregister_sequences:
        with timer.step("coregister"):
            fixed = heads[reference_sequence]
            for name in heads:
                if name != reference_sequence:
                    with register_images(fixed, heads[name], type_of_transform="Rigid") as reg:
                        heads[name] = reg.to_fixed(heads[name], "linear")

    with timer.step("skullstrip"):
        mask = subject_brain_mask(
            raw[reference_sequence],
            heads[reference_sequence],
            method=skullstrip_method,
            template=template,
            template_mask=template_mask,
            deepbet_threshold=deepbet_threshold,
            registration_type=registration_type,
            hdbet_weights=hdbet_weights,
            random_seed=random_seed,
            where=reference_path,
        )
        subject_mask = heads[reference_sequence].new_image_like(mask.astype(np.float32))

    record: dict[str, Any] = {}
    if truth_subject is not None:
        record["brainmask_dice_vs_truth_subject_space"] = round(
            dice(mask, _as_mask(truth_subject)), 4
        )

    with timer.step("register"):
        moving = heads[reference_sequence] * subject_mask
        aligner = (
            register_images(
                template_brain,
                moving,
                type_of_transform=registration_type,
                random_seed=random_seed,
            )
            if register
            else identity(template_brain, moving)
        )
        with aligner as reg:
            out_mask = _as_mask(reg.to_fixed(subject_mask, "nearestNeighbor", grid))
            moved = {k: reg.to_fixed(v, "linear", grid).numpy() for k, v in heads.items()}
            # From the reoriented native grid: one interpolation for labels too.
            moved_labels = {
                k: reg.to_fixed(nifti_to_ants(v), "genericLabel", grid).numpy()
                for k, v in labels_raw.items()
            }
    if not out_mask.any():
        raise InputError(
            f"{reference_path}: brain mask is empty after registration to {template_t1}"
        )

    with timer.step("normalise"):
        normalised, bounds = {}, {}
        for name, volume in moved.items():
            try:
                normalised[name], low, high = percentile_normalise(
                    volume, out_mask, normalise_percentiles
                )
            except ValueError as err:
                raise InputError(f"{images[name]}: {err}") from err
            bounds[name] = {"low": round(low, 4), "high": round(high, 4)}

    affine = ants_affine(grid)
    seg_out = (
        np.rint(moved_labels["seg"]).astype(np.uint8)
        if "seg" in moved_labels
        else np.zeros(out_mask.shape, dtype=np.uint8)
    )
    with timer.step("write"):
        for name, volume in normalised.items():
            save_nifti(volume, affine, out_images[name], dtype=np.float32)
        save_nifti(out_mask, affine, out_brainmask, dtype=np.uint8)
        save_nifti(seg_out, affine, out_seg, dtype=np.uint8)

    template_grid_mask = _as_mask(
        ants.resample_image_to_target(template_mask, grid, interp_type="nearestNeighbor")
    )
    with timer.step("qc"):
        if "truth" in moved_labels:
            record["brainmask_dice_vs_truth"] = round(
                dice(out_mask, moved_labels["truth"] > 0.5), 4
            )
        record["registered_brainmask_dice_vs_template"] = round(
            dice(out_mask, template_grid_mask), 4
        )
        write_qc_png(
            out_qc_png,
            normalised,
            out_mask,
            seg_out,
            title=f"{reference_path.name}  strip={skullstrip_method}  {resolution_mm} mm",
        )

    record.update(
        {
            "reference_image": str(reference_path),
            "skullstrip_method": skullstrip_method,
            # In subject space: registration rescales the brain to the template's size.
            "brain_volume_ml": round(float(mask.sum()) * resolution_mm**3 / 1000.0, 2),
            "lesion_voxels": int((seg_out > 0).sum()),
            # Lesion the stripper cut away (deepbet may drop a large tumour at the surface).
            "lesion_voxels_outside_brainmask": int(((seg_out > 0) & ~out_mask).sum()),
            # Below 1 when crop_shape is too small for the template brain.
            "template_brain_in_box_fraction": round(
                float(template_grid_mask.sum()) / float(_as_mask(template_mask).sum()), 4
            ),
            "output_grid": {
                "space": "template (MNI152) RAS+",
                "resolution_mm": resolution_mm,
                "shape": [int(s) for s in out_mask.shape],
                "affine": np.round(affine, 6).tolist(),
            },
            "normalisation_bounds": bounds,
            "step_order": list(STEP_ORDER),
            "runtimes_s": timer.seconds,
            "settings": {
                "reference_sequence": reference_sequence,
                "n4": n4,
                "n4_shrink_factor": n4_shrink_factor,
                "n4_iterations": list(n4_iterations),
                "registration_type": registration_type if register else None,
                "coregister_sequences": coregister_sequences,
                "deepbet_threshold": deepbet_threshold,
                "deepbet_grids": DEEPBET_GRIDS if skullstrip_method == "deepbet" else None,
                "normalise_percentiles": list(normalise_percentiles),
                "crop_shape": list(crop_shape),
                "seed": seed,
                "ants_random_seed": random_seed,
                # Registration is bit-identical between runs only with one ITK thread.
                "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default"),
            },
        }
    )
    return record
