"""Tests of the cDDPM reference pipeline (``preprocess.pipeline: cddpm``) on tiny volumes.

One run stubs N4 and the QC figure and records which step functions run, in which order
and with which settings; another runs every step for real.
"""

from __future__ import annotations

from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainuad.config_checks import crop_box_errors
from brainuad.errors import InputError
from brainuad.preprocess import cddpm, preprocess_subject
from brainuad.preprocess.crop import centred_box_centre, crop_or_pad, reference_brain_box
from brainuad.preprocess.labels import linear_positive_labels
from brainuad.preprocess.normalise import percentile_normalise
from brainuad.preprocess.smooth import curvature_flow

BOX = (24, 24, 16)


def _ellipsoid(shape, radii, centre=None) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = np.array(shape) / 2 if centre is None else np.asarray(centre, dtype=float)
    return sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stripped T2 brain (anisotropic voxels, RAS), a lesion, and a template brain."""
    folder = tmp_path_factory.mktemp("cddpm")
    rng = np.random.default_rng(0)
    shape = (26, 28, 24)
    brain = _ellipsoid(shape, (10, 12, 9))
    core = _ellipsoid(shape, (5, 6, 4))
    t2 = np.where(brain, 100 + 20 * core + rng.normal(0, 3, shape), 0).astype(np.float32)
    seg = _ellipsoid(shape, (3, 3, 3), (16, 14, 12)).astype(np.uint8)
    affine = np.diag([1.2, 1.1, 1.3, 1.0])
    template = _ellipsoid((34, 36, 30), (12, 14, 11))
    paths = {name: folder / f"{name}.nii.gz" for name in ("t2", "seg", "tt1", "tmask")}
    nib.save(nib.Nifti1Image(t2, affine), paths["t2"])
    nib.save(nib.Nifti1Image(seg, affine), paths["seg"])
    t1 = np.where(template, 80 + 10 * _ellipsoid((34, 36, 30), (6, 6, 5)), 0)
    nib.save(nib.Nifti1Image(t1.astype(np.float32), np.eye(4)), paths["tt1"])
    nib.save(nib.Nifti1Image(template.astype(np.uint8), np.eye(4)), paths["tmask"])
    return paths


def _run(files: dict[str, Path], out: Path, **options) -> dict:
    return preprocess_subject(
        images={"t2": files["t2"]},
        seg=files["seg"],
        truth_brainmask=None,
        template_t1=files["tt1"],
        template_brainmask=files["tmask"],
        out_images={"t2": out / "t2.nii.gz"},
        out_brainmask=out / "brainmask.nii.gz",
        out_seg=out / "seg.nii.gz",
        out_qc_png=out / "qc.png",
        reference_sequence="t2",
        skullstrip_method="none",
        n4_iterations=(200, 200, 200, 200),
        crop_shape=BOX,
        pipeline="cddpm",
        **options,
    )


@pytest.fixture(scope="module")
def stubbed_run(files, tmp_path_factory) -> dict:
    """One run with N4 and the QC figure stubbed, every step function wrapped to record
    the order of the calls and N4's arguments."""
    calls: list[str] = []
    n4_calls: list[dict] = []
    patch = pytest.MonkeyPatch()

    def spy(name, function):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        patch.setattr(cddpm, name, wrapped)

    for name in (
        "resample_to_isotropic",
        "register_images",
        "reference_brain_box",
        "curvature_flow_filter",
        "crop_or_pad",
        "percentile_normalise",
        "save_nifti",
    ):
        spy(name, getattr(cddpm, name))

    def fake_n4(image, **kwargs):
        calls.append("n4_correct")
        n4_calls.append({"image": image.numpy(), **kwargs})
        return image

    patch.setattr(cddpm, "n4_correct", fake_n4)
    patch.setattr(cddpm, "write_qc_png", lambda *a, **k: calls.append("write_qc_png"))
    out = tmp_path_factory.mktemp("stubbed")
    try:
        record = _run(files, out)
    finally:
        patch.undo()
    return {"record": record, "calls": calls, "n4": n4_calls, "out": out}


def test_cddpm_steps_run_in_the_reference_order(stubbed_run):
    record, calls = stubbed_run["record"], stubbed_run["calls"]
    assert record["pipeline"] == "cddpm"
    assert record["steps_run"] == list(cddpm.CDDPM_STEP_ORDER)
    first = {name: calls.index(name) for name in dict.fromkeys(calls)}
    order = [
        "resample_to_isotropic",
        "register_images",
        "reference_brain_box",
        "n4_correct",
        "curvature_flow_filter",
        "crop_or_pad",
        "percentile_normalise",
        "save_nifti",
        "write_qc_png",
    ]
    assert [first[name] for name in order] == sorted(first[name] for name in order)
    assert record["skullstrip_method"] == "none"
    assert record["settings"]["label_interpolation"] == "linear, then > 0"
    assert record["settings"]["curvature_flow"] == {"time_step": 0.125, "iterations": 3}


def test_cddpm_n4_gets_the_reference_settings(stubbed_run):
    (call,) = stubbed_run["n4"]
    assert call["iterations"] == (200, 200, 200, 200)
    assert call["tolerance"] == 5e-4
    assert call["shrink_factor"] == 4
    assert call["spline_distance_mm"] == 200.0
    # The fitting mask is ANTsPy 0.3's default, ants.get_mask of the image itself.
    image = ants.from_numpy(call["image"])
    np.testing.assert_array_equal(call["mask"].numpy(), ants.get_mask(image).numpy())
    # The weights: the cut brain mask smoothed with a 1 mm Gaussian, so fractions at the edge.
    weights = call["weight_mask"].numpy()
    assert weights.shape == call["image"].shape
    assert weights[(weights > 0) & (weights < 1)].size > 0.0
    assert weights.max() <= 1.0 + 1e-6


def test_cddpm_outputs_are_the_reference_loader_volumes(stubbed_run):
    out = stubbed_run["out"]
    image = nib.load(out / "t2.nii.gz")
    t2 = np.asanyarray(image.dataobj)
    mask = np.asanyarray(nib.load(out / "brainmask.nii.gz").dataobj) > 0
    seg = np.asanyarray(nib.load(out / "seg.nii.gz").dataobj)
    assert t2.shape == mask.shape == seg.shape == BOX
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # the template's ITK RAI axes
    assert t2.min() == 0.0 and t2.max() == 1.0
    # 1st and 99th brain percentiles map to 0 and 1: about 1 % of the brain at each end.
    assert 0.0 < np.mean(t2[mask] == 1.0) < 0.03
    assert seg.any() and set(np.unique(seg)) == {0, 1}


def test_unknown_pipeline_is_refused(files, tmp_path):
    with pytest.raises(InputError, match=r"preprocess.pipeline: 'other'"):
        preprocess_subject(
            images={"t2": files["t2"]},
            seg=None,
            truth_brainmask=None,
            template_t1=files["tt1"],
            template_brainmask=files["tmask"],
            out_images={"t2": tmp_path / "t2.nii.gz"},
            out_brainmask=tmp_path / "m.nii.gz",
            out_seg=tmp_path / "s.nii.gz",
            out_qc_png=tmp_path / "q.png",
            pipeline="other",
        )


def test_skullstrip_choice():
    assert cddpm.choose_skullstrip("deepbet", "/w", ["t1", "t2"], "t1")[:2] == ("hdbet", "t2")
    assert cddpm.choose_skullstrip("deepbet", None, ["t1", "t2"], "t1")[:2] == ("deepbet", "t1")
    assert cddpm.choose_skullstrip("none", "/w", ["t2"], "t2")[:2] == ("none", "t2")
    assert cddpm.choose_skullstrip("deepbet", "/w", ["t1"], "t1")[:2] == ("hdbet", "t1")


def test_curvature_flow_is_simpleitk_filter_as_the_reference_reads_it(tmp_path):
    import SimpleITK as sitk  # noqa: N813

    rng = np.random.default_rng(3)
    volume = ndimage.gaussian_filter(rng.normal(100, 20, (14, 12, 10)), 1).astype(np.float32)
    spacing = (1.0, 1.5, 2.0)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), path)
    # The reference's sitk_reader (create_dataset.py), verbatim in its calls.
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    image = sitk.CurvatureFlow(image1=image, timeStep=0.125, numberOfIterations=3)
    expected = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    smoothed = curvature_flow(volume, spacing)
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-4)
    assert np.abs(smoothed - volume).max() > 0.1  # it does smooth
    assert smoothed.var() < volume.var()


def test_linear_then_positive_labels_differ_from_nearest():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[4:8, 4:8, 4:8] = 1
    labels[8, 4:8, 4:8] = 2  # a second label on the +x face

    def move(volume, order):
        return ndimage.shift(volume, (0.4, 0, 0), order=order, mode="constant")

    linear = linear_positive_labels(labels, lambda v: move(v, 1))
    nearest = move(labels, 0)
    # Shifted by 0.4 voxel, output x = i reads input x = i - 0.4: linear interpolation
    # touches label 1 from x = 4 (0.6 of input 4) to x = 8 (0.4 of input 7), label 2 at
    # x = 8 (0.6) and x = 9 (0.4 of input 8) ...
    assert set(np.flatnonzero(linear[:, 5, 5])) == {4, 5, 6, 7, 8, 9}
    # ... nearest neighbour reads input round(8.6) = 9 at x = 9: background.
    assert set(np.flatnonzero(nearest[:, 5, 5])) == {4, 5, 6, 7, 8}
    # Where two labels meet, the larger weight wins: x = 8 is 0.4 of label 1 and 0.6 of 2.
    assert linear[8, 5, 5] == 2 and linear[7, 5, 5] == 1 and linear[4, 5, 5] == 1
    assert linear[9, 5, 5] == 2
    # A binary volume gets exactly "linear, then > 0".
    binary = (labels > 0).astype(np.uint8)
    np.testing.assert_array_equal(
        linear_positive_labels(binary, lambda v: move(v, 1)),
        (move(binary.astype(np.float32), 1) > 0).astype(np.uint8),
    )


def test_crop_and_cut_follow_torchio_and_cut_py():
    volume = np.arange(7 * 10 * 5, dtype=np.float32).reshape(7, 10, 5)
    box, _ = crop_or_pad(
        volume, np.eye(4), (4, 10, 8), centred_box_centre(volume.shape, (4, 10, 8))
    )
    # torchio CropOrPad: ceil(d / 2) at the start. 7 -> 4 cuts 2 then 1; 5 -> 8 pads 2 then 1.
    np.testing.assert_array_equal(box[:, :, 2:7], volume[2:6])
    assert not box[:, :, :2].any() and not box[:, :, 7:].any()
    mask = np.zeros((9, 9, 9), bool)
    mask[2:6, 3, 1:8] = True
    assert reference_brain_box(mask) == (slice(2, 5), slice(3, 3), slice(1, 7))


def test_reference_normalisation_keeps_outside_values():
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 100, (6, 6, 6)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[1:5, 1:5, 1:5] = True
    low, high = np.percentile(data[mask], [1, 99])
    clipped = np.clip(data, low, high)  # torchio: clip everything, then min-max
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    out, _, _ = percentile_normalise(data, mask, (1, 99), zero_outside=False)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[~mask].any()


def test_reference_box_may_cut_the_template_brain():
    brain = _ellipsoid((40, 40, 40), (15, 15, 15))
    config = {"preprocess": {"crop_shape": [32, 32, 20], "resolution_mm": 1.0}}
    config["slices"] = {"size": 32}
    assert any("enlarge the box" in e for e in crop_box_errors(config, brain))
    config["preprocess"]["pipeline"] = "cddpm"
    assert not any("enlarge the box" in e for e in crop_box_errors(config, brain))


def test_cddpm_pipeline_end_to_end(files, tmp_path):
    """Every step for real (N4 with 4 x 200 iterations, the QC figure): about 4 s."""
    record = _run(files, tmp_path)
    assert record["steps_run"] == list(cddpm.CDDPM_STEP_ORDER)
    assert (tmp_path / "qc.png").stat().st_size > 0
    seg = np.asanyarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert seg.sum() > 0


def test_paper_config_plans_the_cddpm_pipeline_and_default_keeps_its_own(tmp_path):
    import yaml

    from brainuad.config import ConfigError
    from brainuad.config_checks import check_study_config
    from brainuad.data.datasets import preprocess_arguments

    root = Path(__file__).resolve().parents[1]
    paper = yaml.safe_load((root / "config" / "paper.yaml").read_text())
    paper["data_dir"] = str(tmp_path)
    for spec in paper["datasets"].values():
        (tmp_path / spec["path"]).mkdir(parents=True)
    check_study_config(paper, str(root / "config" / "schema.yaml"))
    for dataset in paper["datasets"]:
        arguments = preprocess_arguments(paper, dataset)
        assert arguments["pipeline"] == "cddpm"
        assert arguments["crop_shape"] == [192, 192, 100]
    assert paper["splits"]["healthy_sizes"] == {"train": 358, "val": 44, "test": 158}
    default = yaml.safe_load((root / "config" / "config.yaml").read_text())
    assert all("pipeline" not in preprocess_arguments(default, d) for d in default["datasets"])
    paper["splits"]["lesion_val_subjects"]["ixi"] = 3
    with pytest.raises(ConfigError, match=r"lesion_val_subjects.ixi: not a lesion dataset"):
        check_study_config(paper, str(root / "config" / "schema.yaml"))
