"""config/paper.yaml's reference protocol end to end, through Snakemake, on datasets written
in their download layouts (brainuad.data.layout_fixtures): IXI (T1 + T2 heads) and BraTS
2021 (stripped T2), from the raw files to the main table and the significance tables.

The study is paper.yaml itself, with only its sizes shrunk (`shrunk_paper_config`): the
cDDPM preprocessing pipeline, the paper's split sizes (per subject counts), the reference
evaluation mode (central 100 mm, every voxel, post-processed on that grid), the best-Dice
headline found by bisection on the lesion validation split and the whole-image healthy FPR.
To keep it small the volumes are 2 mm (crop 96 x 96 x 60 = 120 mm along z, so the central
100 mm is a real cut), the slices 48 px (4 mm in-plane) and the reference grid 4 mm between
slices: the reference's x2 along z and isotropic voxels, at half the resolution.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainuad.data.layout_fixtures import WRITERS

# Heavy end-to-end run: `make test-all`, not CI's `make test` (its 30-minute budget).
pytestmark = pytest.mark.extended

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper.yaml"

N_IXI = 7  # the last one has no T2 and is skipped: 6 healthy subjects
N_BRATS = 7  # paper.yaml's lesion_train_fraction {brats21: 0.3}: 2 train, 2 val, 3 test
SIZES = {"train": 3, "val": 1, "test": 2}  # per fold; val blocks disjoint over 2 folds
LESION_VAL = 2
LESION_TRAIN = 2
N_TEST = N_BRATS - LESION_VAL - LESION_TRAIN
GRID = {"extent_mm": 100, "slice_spacing_mm": 4.0}
SLICE_PX = 48  # 96 px at 2 mm -> 4 mm in-plane
N_GRID_SLICES = 25  # 100 mm / 4 mm
METHODS = ("intensity_t2", "ae_t2", "ddpm_t2")
TINY_TRAINING = {
    "max_steps": 8,
    "batch_size": 8,
    "learning_rate": 1.0e-3,
    "checkpoint_every": 4,
    "validate_every": 4,
    "num_workers": 0,
}


def shrunk_paper_config(data: Path) -> dict:
    """config/paper.yaml with two of its datasets and three of its methods, at test size;
    every protocol setting (pipeline, splits, evaluation) is paper.yaml's own."""
    config = yaml.safe_load(PAPER.read_text())
    datasets = config["datasets"]
    config["datasets"] = {
        "ixi": datasets["ixi"] | {"path": str(data / "ixi")},
        "brats21": datasets["brats21"] | {"path": str(data / "brats2021")},
    }
    config["device"] = "cpu"
    config["preprocess"] |= {
        "resolution_mm": 2.0,
        "crop_shape": [96, 96, 60],
        "n4_shrink_factor": 2,
        "n4_iterations": [20, 20, 20],
    }
    config["slices"]["size"] = SLICE_PX
    config["splits"] |= {
        "n_folds": 2,
        "healthy_sizes": SIZES,
        "lesion_val_subjects": {"brats21": LESION_VAL},
    }
    methods = config["methods"]
    config["methods"] = {name: methods[name] for name in METHODS}
    config["methods"]["ae_t2"] |= {
        "model": {"channels": [8, 16], "strides": [2, 2]},
        "training": TINY_TRAINING,
    }
    config["methods"]["ddpm_t2"] |= {
        "model": {
            "noise": "gaussian",
            "channels": [16, 32],
            "num_res_blocks": 1,
            "attention_levels": [False, False],
            "num_head_channels": 16,
            "norm_num_groups": 8,
            "test_timestep": 250,
        },
        "training": TINY_TRAINING | {"sampler": "volumes", "score_checkpoint": "best"},
        "score_batch_size": 16,
    }
    evaluation = config["evaluation"]
    evaluation["reference_grid"] = GRID
    evaluation["significance"] |= {"min_pairs": 3, "bootstrap_resamples": 200}
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("paper_protocol")
    WRITERS["ixi"](base / "data" / "ixi", n_subjects=N_IXI, seed=5)
    WRITERS["brats2021"](base / "data" / "brats2021", n_subjects=N_BRATS, seed=5)
    configfile = base / "config.yaml"
    configfile.write_text(yaml.safe_dump(shrunk_paper_config(base / "data")))
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(base / "work"), "--configfile", str(configfile),
        "--cores", "2", "tables", "figures",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return base / "work"


def test_paper_config_keeps_its_protocol_when_shrunk(tmp_path: Path) -> None:
    """What the end-to-end run tests is paper.yaml's protocol, not a setting of the test."""
    paper = yaml.safe_load(PAPER.read_text())
    shrunk = shrunk_paper_config(tmp_path)
    assert shrunk["preprocess"]["pipeline"] == paper["preprocess"]["pipeline"] == "cddpm"
    for key in ("mode", "postprocess", "healthy_fprs", "healthy_fpr_region", "default_protocol"):
        assert shrunk["evaluation"][key] == paper["evaluation"][key]
    assert shrunk["splits"]["lesion_train_fraction"] == {"brats21": 0.3}
    assert paper["evaluation"]["mode"] == "reference"
    assert paper["evaluation"]["best_dice_search"] == "bisection"
    assert paper["evaluation"]["default_protocol"] == "best_dice_val"
    # the reference grid: x2 along the slice axis, isotropic with the slices' in-plane pixel
    paper_grid = paper["evaluation"]["reference_grid"]
    paper_pixel = paper["preprocess"]["crop_shape"][0] * paper["preprocess"]["resolution_mm"]
    assert paper_grid["slice_spacing_mm"] == 2 * paper["preprocess"]["resolution_mm"]
    assert paper_grid["slice_spacing_mm"] == paper_pixel / paper["slices"]["size"]
    pixel = shrunk["preprocess"]["crop_shape"][0] * shrunk["preprocess"]["resolution_mm"]
    assert GRID["slice_spacing_mm"] == 2 * shrunk["preprocess"]["resolution_mm"]
    assert GRID["slice_spacing_mm"] == pixel / SLICE_PX
    assert GRID["extent_mm"] == paper_grid["extent_mm"]


def test_preprocessing_is_the_cddpm_pipeline_with_its_fallbacks_recorded(study: Path) -> None:
    for dataset, n_subjects in (("ixi", N_IXI - 1), ("brats21", N_BRATS)):
        qc = sorted((study / "results" / "preprocessed" / dataset).glob("*/qc.json"))
        assert len(qc) == n_subjects
        for path in qc:
            record = json.loads(path.read_text())
            assert record["pipeline"] == "cddpm", path
            # no HD-BET weights and no SRI24 path given: deepbet and MNI152, recorded
            if dataset == "ixi":
                assert record["skullstrip_method"] == "deepbet", path
            assert "mni" in record["template"].lower(), path


def test_splits_have_the_configured_sizes(study: Path) -> None:
    ixi = pd.read_csv(study / "results" / "splits" / "ixi.csv")
    val_blocks = []
    for _, fold in ixi.groupby("fold"):
        counts = fold["split"].value_counts().to_dict()
        assert counts == SIZES
        val_blocks.append(set(fold.loc[fold["split"] == "val", "subject"]))
    assert not set.intersection(*val_blocks)  # disjoint validation blocks
    brats = pd.read_csv(study / "results" / "splits" / "brats21.csv")
    for _, fold in brats.groupby("fold"):
        counts = fold["split"].value_counts().to_dict()
        assert counts == {"train": LESION_TRAIN, "val": LESION_VAL, "test": N_TEST}


def test_thresholds_are_chosen_as_the_paper_on_validation_only(study: Path) -> None:
    splits = pd.read_csv(study / "results" / "splits" / "brats21.csv")
    for method in METHODS:
        for fold in (0, 1):
            path = study / "results" / "calibration" / method / f"fold{fold}" / "threshold.json"
            thresholds = json.loads(path.read_text())["thresholds"]
            best = thresholds["best_dice_val/brats21"]
            assert best["search"] == "bisection" and best["bisection_steps"] == 10
            assert best["evaluation"]["mode"] == "reference"
            assert best["chosen_on"]["uses_pixel_labels"]
            val = splits[(splits["fold"] == fold) & (splits["split"] == "val")]
            assert sorted(best["chosen_on"]["subjects"]) == sorted(val["subject"])
            # every voxel of the reference grid of the validation volumes is pooled
            assert best["chosen_on"]["n_voxels"] == LESION_VAL * N_GRID_SLICES * SLICE_PX**2
            healthy = thresholds["healthy_fpr_5"]
            assert healthy["fpr_denominator"] == {"region": "image", "pooling": "voxels"}
            assert not healthy["chosen_on"]["uses_pixel_labels"]


def test_metrics_evaluate_every_voxel_of_the_reference_grid(study: Path) -> None:
    splits = pd.read_csv(study / "results" / "splits" / "brats21.csv")
    for method in METHODS:
        for fold in (0, 1):
            stem = study / "results" / "metrics" / method / f"fold{fold}" / "brats21"
            summary = json.loads(stem.with_suffix(".json").read_text())
            assert summary["evaluation"]["mode"] == "reference"
            assert summary["evaluation"]["spacing_mm"] == [4.0, 4.0, 4.0]
            assert summary["slice_level"]["n_slices"] == N_TEST * N_GRID_SLICES
            table = pd.read_csv(stem.with_suffix(".csv"))
            test = splits[(splits["fold"] == fold) & (splits["split"] == "test")]
            assert sorted(table["subject"]) == sorted(test["subject"])
            assert (table["region_voxels"] == N_GRID_SLICES * SLICE_PX**2).all()


def test_main_table_heads_with_the_papers_protocol_and_shows_the_label_free_one(
    study: Path,
) -> None:
    main = (study / "results" / "tables" / "main.md").read_text()
    header = next(line for line in main.splitlines() if line.startswith("|"))
    assert header.index("pixel labels") < header.index("label-free")
    for method in METHODS:
        assert method in main


def test_significance_tables_and_figure(study: Path) -> None:
    tables = study / "results" / "tables"
    tests = pd.read_csv(tables / "significance.csv")
    pairs = {tuple(sorted(p)) for p in tests[["method_a", "method_b"]].itertuples(index=False)}
    assert pairs == {("ae_t2", "ddpm_t2"), ("ae_t2", "intensity_t2"), ("ddpm_t2", "intensity_t2")}
    assert set(tests["dataset"]) == {"brats21"}
    assert "\\begin{tabular}" in (tables / "significance.tex").read_text()
    intervals = pd.read_csv(tables / "confidence_intervals.csv")
    assert set(intervals["method"]) == set(METHODS)
    assert (study / "results" / "figures" / "significance.png").stat().st_size > 0


def test_report_shows_the_significance_tables_and_figure(study: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.zip"
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(study), "--configfile", str(study.parent / "config.yaml"),
        "--report", str(report),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
    for expected in ("significance.md", "confidence_intervals.md", "significance.png", "main.md"):
        assert any(name.endswith(expected) for name in names), (expected, names)
