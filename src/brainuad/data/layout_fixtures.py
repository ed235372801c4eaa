"""Small datasets in the real download layouts, written from the synthetic generator.

For tests and for trying the workflow without the downloads: each writer makes a few
subjects with the layout's file names, grid (orientation, voxel size, shape), dtype and
label values (BraTS 1/2/4, WMH 1 and 2, binary ATLAS and MSLUB masks), plus the cDDPM
preprocessed release (with its split CSVs) and a BIDS dataset with derivatives lesion
masks. Heads come from
:func:`brainuad.data.synthetic.generate_subject`; "registered" layouts (BraTS, ATLAS) are
resampled onto their grid around the subject's brain, which the synthetic generator keeps
within 10 degrees and 5 mm of MNI152, and stripped layouts (BraTS) are multiplied by the
true brain mask.

``python -m brainuad.data.layout_fixtures OUT_DIR`` writes all of them under ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainuad.data.synthetic import SyntheticSubject, generate_subject, subject_seed

# Coarse voxels keep generation fast; the files are still written on the layouts' grids.
GENERATOR_OPTIONS = {"voxel_size_range": (2.5, 3.0), "deformation_mm": 2.0}


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))


def _brain_centre(subject: SyntheticSubject) -> np.ndarray:
    mask = np.asanyarray(subject.brainmask.dataobj) > 0
    centre_voxel = np.array(ndimage.center_of_mass(mask))
    return nib.affines.apply_affine(subject.brainmask.affine, centre_voxel)


def layout_grid(
    shape: tuple[int, int, int], voxel_mm: tuple[float, ...], signs: tuple[int, ...], centre
) -> np.ndarray:
    """Affine of an axis-aligned grid of ``shape`` whose centre is at world ``centre``."""
    affine = np.diag([*(s * v for s, v in zip(signs, voxel_mm, strict=True)), 1.0])
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


def resample(img: nib.Nifti1Image, shape, affine: np.ndarray, order: int) -> np.ndarray:
    """``img`` sampled on the grid (``shape``, ``affine``); 0 outside its field of view."""
    to_source = np.linalg.inv(img.affine) @ affine
    data = np.asanyarray(img.dataobj).astype(np.float32)
    return ndimage.affine_transform(
        data, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(shape), order=order
    )


def _subjects(lesion: str, n: int, seed: int, name: str) -> list[SyntheticSubject]:
    return [
        generate_subject(seed=subject_seed(seed, name, str(i)), lesion=lesion, **GENERATOR_OPTIONS)
        for i in range(n)
    ]


def _scaled_int16(volume: np.ndarray) -> np.ndarray:
    return np.clip(volume / max(float(volume.max()), 1e-6) * 3000.0, 0, 32767)


def write_ixi(root: Path, n_subjects: int = 3, seed: int = 0) -> list[Path]:
    """IXI: ``IXI<nnn>-<site>-<nnnn>-{T1,T2}.nii.gz``, raw int16 heads; T2 on another
    (axis-permuted) grid than T1, as IXI's axial T2 and sagittal T1. The last subject has no
    T2 (IXI has a few such), to be skipped by the adapter."""
    sites = ("Guys", "HH", "IOP")
    written = []
    for i, subject in enumerate(_subjects("none", n_subjects, seed, "ixi")):
        stem = f"IXI{12 + i:03d}-{sites[i % 3]}-{1000 + i:04d}"
        t1 = subject.images["t1"]
        path = root / "IXI-T1" / f"{stem}-T1.nii.gz"
        _save(_scaled_int16(t1.get_fdata()), t1.affine, path, "int16")
        written.append(path)
        if i == n_subjects - 1 and n_subjects > 2:
            continue
        t2 = subject.images["t2"]
        # Voxel axes permuted (world unchanged): a different grid of the same head.
        data = np.transpose(t2.get_fdata(), (2, 0, 1))
        affine = t2.affine.copy()
        affine[:, :3] = t2.affine[:, [2, 0, 1]]
        path = root / "IXI-T2" / f"{stem}-T2.nii.gz"
        _save(_scaled_int16(data), affine, path, "int16")
        written.append(path)
    return written


def write_brats2021(root: Path, n_subjects: int = 3, seed: int = 0) -> list[Path]:
    """BraTS 2021: 240 x 240 x 155 at 1 mm (axes L-P-S flipped as the release's affine),
    skull-stripped int16 images and uint8 labels 1 necrosis, 2 oedema, 4 enhancing."""
    shape = (240, 240, 155)
    written = []
    for i, subject in enumerate(_subjects("tumour", n_subjects, seed, "brats")):
        name = f"BraTS2021_{i:05d}"
        affine = layout_grid(shape, (1.0, 1.0, 1.0), (-1, -1, 1), _brain_centre(subject))
        brain = resample(subject.brainmask, shape, affine, 0) > 0
        seg = resample(subject.seg, shape, affine, 0).astype(np.uint8)
        seg[seg == 3] = 4  # synthetic 3 (enhancing) is BraTS label 4
        for sequence, source in (("t1", "t1"), ("t1ce", "t1"), ("t2", "t2"), ("flair", "flair")):
            volume = resample(subject.images[source], shape, affine, 1) * brain
            if sequence == "t1ce":
                volume = volume * (1.0 + 0.5 * (seg == 4))
            path = root / name / f"{name}_{sequence}.nii.gz"
            _save(_scaled_int16(volume), affine, path, "int16")
            written.append(path)
        path = root / name / f"{name}_seg.nii.gz"
        _save(seg, affine, path, "uint8")
        written.append(path)
    return written


# MNI152NLin2009aSym 1 mm grid of ATLAS R2.0.
ATLAS_SHAPE = (197, 233, 189)
ATLAS_ORIGIN = np.array([-98.0, -134.0, -72.0])


def write_atlas2(root: Path, n_subjects: int = 3, seed: int = 0) -> list[Path]:
    """ATLAS R2.0: ``ATLAS_2/Training/R001/sub-r001s<nnn>/ses-1/anat/`` T1w (float32, on
    the MNI152NLin2009aSym 1 mm grid) and a binary uint8 lesion mask."""
    affine = np.eye(4)
    affine[:3, 3] = ATLAS_ORIGIN
    written = []
    for i, subject in enumerate(_subjects("stroke", n_subjects, seed, "atlas")):
        sub = f"sub-r001s{i + 1:03d}"
        anat = root / "ATLAS_2" / "Training" / "R001" / sub / "ses-1" / "anat"
        stem = f"{sub}_ses-1_space-MNI152NLin2009aSym"
        t1 = resample(subject.images["t1"], ATLAS_SHAPE, affine, 1)
        seg = resample(subject.seg, ATLAS_SHAPE, affine, 0) > 0
        _save(t1, affine, anat / f"{stem}_T1w.nii.gz", "float32")
        _save(seg, affine, anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz", "uint8")
        written += [anat / f"{stem}_T1w.nii.gz", anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"]
    return written


def write_wmh2017(root: Path, n_subjects: int = 3, seed: int = 0) -> list[Path]:
    """WMH 2017 (Utrecht layout): ``Utrecht/<id>/pre/{FLAIR,T1}.nii.gz`` on the FLAIR's 240 x
    240 x 48 grid of 0.96 x 0.96 x 3 mm (float32) and ``wmh.nii.gz`` with label 1 (WMH) and
    a blob of label 2 (other pathology), float32 as in the release."""
    shape, voxel = (240, 240, 48), (0.958, 0.958, 3.0)
    written = []
    for i, subject in enumerate(_subjects("wmh", n_subjects, seed, "wmh")):
        folder = root / "Utrecht" / str(2 * i)
        affine = layout_grid(shape, voxel, (-1, 1, 1), _brain_centre(subject))
        seg = resample(subject.seg, shape, affine, 0)
        brain = resample(subject.brainmask, shape, affine, 0) > 0
        # "Other pathology": a small blob of label 2 in the brain, away from the WMH.
        centre = np.array(np.nonzero(brain & (seg == 0))).mean(axis=1)
        grid = np.indices(shape).astype(np.float32)
        radius = (grid - centre[:, None, None, None]) * np.array(voxel)[:, None, None, None]
        blob = (np.sqrt((radius**2).sum(axis=0)) < 6.0) & brain & (seg == 0)
        seg[blob] = 2
        for sequence, name in (("flair", "FLAIR"), ("t1", "T1")):
            path = folder / "pre" / f"{name}.nii.gz"
            _save(resample(subject.images[sequence], shape, affine, 1), affine, path, "float32")
            written.append(path)
        _save(seg, affine, folder / "wmh.nii.gz", "float32")
        written.append(folder / "wmh.nii.gz")
    return written


def write_mslub(root: Path, n_subjects: int = 3, seed: int = 0) -> list[Path]:
    """MSLUB (original names): ``patient<nn>/{T1W,T2W,FLAIR}.nii.gz`` raw float32 heads on
    one grid, and the binary uint8 ``consensus_gt.nii.gz``."""
    written = []
    for i, subject in enumerate(_subjects("wmh", n_subjects, seed, "mslub")):
        folder = root / f"patient{i + 1:02d}"
        for sequence, name in (("t1", "T1W"), ("t2", "T2W"), ("flair", "FLAIR")):
            image = subject.images[sequence]
            _save(image.get_fdata(), image.affine, folder / f"{name}.nii.gz", "float32")
            written.append(folder / f"{name}.nii.gz")
        seg = np.asanyarray(subject.seg.dataobj) > 0
        _save(seg, subject.seg.affine, folder / "consensus_gt.nii.gz", "uint8")
        written.append(folder / "consensus_gt.nii.gz")
    return written


# cDDPM release: volumes cropped to the brain box at 1 mm, LPS axes as SimpleITK writes them.
RELEASE_SHAPE = (144, 176, 144)


def _release_volumes(subject: SyntheticSubject, sequences) -> dict[str, np.ndarray]:
    affine = layout_grid(RELEASE_SHAPE, (1.0, 1.0, 1.0), (-1, -1, 1), _brain_centre(subject))
    brain = resample(subject.brainmask, RELEASE_SHAPE, affine, 0) > 0
    volumes = {s: resample(subject.images[s], RELEASE_SHAPE, affine, 1) * brain for s in sequences}
    volumes["mask"] = brain.astype(np.uint8)
    if np.asanyarray(subject.seg.dataobj).any():
        volumes["seg"] = (resample(subject.seg, RELEASE_SHAPE, affine, 0) > 0).astype(np.uint8)
    return {"affine": affine, **volumes}


def _split_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["img_name", "img_path", "mask_path", "seg_path", "age", "label"]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=True)  # with the index, as the release
    return path


def write_cddpm_release(
    root: Path, n_subjects: int = 3, seed: int = 0, n_folds: int = 2
) -> list[Path]:
    """The cDDPM preprocessed release: ``Train/ixi/{t1,t2,mask}``, ``Test/Brats21/{t2,mask,
    seg}``, ``Test/ATLAS_v2/{t1,mask,seg}`` (float32 stripped volumes, uint8 masks, binary
    labels) and ``splits/`` (``IXI_train_fold<k>``, ``IXI_val_fold<k>``, ``IXI_test``,
    ``<set>_val``, ``<set>_test`` and the T2 list ``avail_t2.csv``), two subjects per lesion
    set (one val, one test). IXI has ``n_subjects``
    subjects, the last without a T2 file (listed in the splits, as in the release); the first
    is the test subject and the others are dealt round-robin to the folds' val sets."""
    written = []
    ixi_rows: list[tuple[str, dict]] = []
    for i, subject in enumerate(_subjects("none", n_subjects, seed, "release_ixi")):
        name = f"IXI{12 + i:03d}-{('Guys', 'HH', 'IOP')[i % 3]}-{1000 + i:04d}"
        has_t2 = not (i == n_subjects - 1 and n_subjects > 2)
        volumes = _release_volumes(subject, ["t1", "t2"] if has_t2 else ["t1"])
        for kind in ("t1", "t2", "mask"):
            if kind in volumes:
                path = root / "Train" / "ixi" / kind / f"{name}_{kind}.nii.gz"
                dtype = "uint8" if kind == "mask" else "float32"
                _save(volumes[kind], volumes["affine"], path, dtype)
                written.append(path)
        row = {
            "img_name": f"{name}_t1.nii.gz",
            "img_path": f"/Train/ixi/t1/{name}_t1.nii.gz",
            "mask_path": f"/Train/ixi/mask/{name}_mask.nii.gz",
            "seg_path": None,
            "age": 30.0 + i,
            "label": 0,
        }
        ixi_rows.append((name, row))
    splits = root / "splits"
    test, rest = ixi_rows[:1], ixi_rows[1:]
    written.append(_split_csv(splits / "IXI_test.csv", [r for _, r in test]))
    for k in range(n_folds):
        val = [r for j, (_, r) in enumerate(rest) if j % n_folds == k]
        train = [r for j, (_, r) in enumerate(rest) if j % n_folds != k]
        written.append(_split_csv(splits / f"IXI_train_fold{k}.csv", train))
        written.append(_split_csv(splits / f"IXI_val_fold{k}.csv", val))
    t2_names = [r["img_name"].replace("_t1", "_t2") for _, r in ixi_rows[:-1]]
    pd.DataFrame({"0": t2_names}).to_csv(splits / "avail_t2.csv", index=False)
    for name, lesion, sequence in (("Brats21", "tumour", "t2"), ("ATLAS_v2", "stroke", "t1")):
        rows = []
        for i, subject in enumerate(_subjects(lesion, 2, seed, name)):
            stem = f"{name}_{i:05d}"
            volumes = _release_volumes(subject, [sequence])
            for kind in (sequence, "mask", "seg"):
                path = root / "Test" / name / kind / f"{stem}_{kind}.nii.gz"
                dtype = "float32" if kind == sequence else "uint8"
                _save(volumes[kind], volumes["affine"], path, dtype)
                written.append(path)
            rows.append(
                {
                    "img_name": f"{stem}_t1.nii.gz",
                    # The release's paths name the T1 file, rewritten by the reference.
                    "img_path": f"/Test/{name}/t1/{stem}_t1.nii.gz",
                    "mask_path": f"/Test/{name}/mask/{stem}_mask.nii.gz",
                    "seg_path": f"/Test/{name}/seg/{stem}_seg.nii.gz",
                    "age": None,
                    "label": 1,
                }
            )
        written.append(_split_csv(splits / f"{name}_val.csv", rows[:1]))
        written.append(_split_csv(splits / f"{name}_test.csv", rows[1:]))
    return written


def write_bids(root: Path, n_subjects: int = 3, seed: int = 0, lesion: str = "wmh") -> list[Path]:
    """A BIDS dataset: ``sub-<nn>/ses-1/anat/sub-<nn>_ses-1_{T1w,T2w,FLAIR}.nii.gz`` (sub-02
    without a session folder), raw float32 heads, T2w on another (axis-permuted) grid. Subjects
    1..n are complete; one more has no T2w (skipped when T2 is used). With ``lesion`` other
    than ``none`` each of those has a binary uint8 mask on the T1w grid in
    ``derivatives/lesions/sub-<nn>/[ses-1/]anat/..._label-lesion_mask.nii.gz``, and a last
    subject is a healthy control without a mask (skipped from a lesion dataset)."""
    written = []
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        '{"Name": "brainuad fixture", "BIDSVersion": "1.8.0"}\n'
    )
    kinds = [lesion] * (n_subjects + 1) + (["none"] if lesion != "none" else [])
    for i, kind in enumerate(kinds):
        subject = generate_subject(
            seed=subject_seed(seed, "bids", str(i)), lesion=kind, **GENERATOR_OPTIONS
        )
        sub = f"sub-{i + 1:02d}"
        session = "" if i == 1 else "ses-1"
        anat = root / sub / session / "anat"
        stem = f"{sub}_{session}" if session else sub
        for sequence, suffix in (("t1", "T1w"), ("t2", "T2w"), ("flair", "FLAIR")):
            if sequence == "t2" and i == n_subjects:
                continue  # the subject without T2w
            image = subject.images[sequence]
            data, affine = image.get_fdata(), image.affine.copy()
            if sequence == "t2":  # voxel axes permuted (world unchanged): another grid
                data = np.transpose(data, (2, 0, 1))
                affine[:, :3] = image.affine[:, [2, 0, 1]]
            _save(data, affine, anat / f"{stem}_{suffix}.nii.gz", "float32")
            written.append(anat / f"{stem}_{suffix}.nii.gz")
        if kind != "none":
            seg = np.asanyarray(subject.seg.dataobj) > 0
            folder = root / "derivatives" / "lesions" / sub / session / "anat"
            path = folder / f"{stem}_label-lesion_mask.nii.gz"
            _save(seg, subject.seg.affine, path, "uint8")
            written.append(path)
    return written


WRITERS: dict[str, Callable[..., list[Path]]] = {
    "ixi": write_ixi,
    "brats2021": write_brats2021,
    "atlas2": write_atlas2,
    "wmh2017": write_wmh2017,
    "mslub": write_mslub,
    "cddpm_release": write_cddpm_release,
    "bids": write_bids,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--sources", nargs="*", default=list(WRITERS))
    args = parser.parse_args(argv)
    for source in args.sources:
        files = WRITERS[source](args.out_dir / source, args.subjects)
        print(f"{source}: {len(files)} files under {os.fspath(args.out_dir / source)}")


if __name__ == "__main__":
    main()
