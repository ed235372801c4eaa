"""QC of the synthetic cohorts' lesion volumes, and their config settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from brainuad.config import ConfigError, check_config
from brainuad.data.lesion_qc import (
    Panel,
    comparison_markdown,
    lesion_volume_records,
    plot_lesion_volumes,
    save_png,
    target_quartiles,
    volume_comparison,
)
from brainuad.data.lesion_volumes import PUBLISHED_VOLUMES
from brainuad.data.synthetic import generate_subject
from brainuad.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config" / "schema.yaml")


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


def test_default_config_states_the_published_values():
    lesions = _config("config.yaml")["synthetic"]["lesions"]
    assert set(lesions) == set(PUBLISHED_VOLUMES)
    for kind, settings in lesions.items():
        volume = settings["volume_ml"]
        assert (volume["q1"], volume["median"], volume["q3"]) == PUBLISHED_VOLUMES[kind].quartiles
        assert target_quartiles(kind, settings) == PUBLISHED_VOLUMES[kind].quartiles
    assert target_quartiles("wmh", {}) == PUBLISHED_VOLUMES["wmh"].quartiles


def test_lesion_settings_are_validated():
    config = _config("tiny.yaml")
    config["synthetic"]["lesions"] = {"wmh": {"volume_ml": {"q1": 1, "median": 2}}}
    with pytest.raises(WorkflowError, match="q3"):
        validate(copy.deepcopy(config), SCHEMA)
    config["synthetic"]["lesions"] = {"glioma": {}}
    with pytest.raises(WorkflowError, match="glioma"):
        validate(copy.deepcopy(config), SCHEMA)
    config["synthetic"]["lesions"] = {"ms": {"volume_ml": {"q1": 5, "median": 2, "q3": 9}}}
    validate(config, SCHEMA)
    with pytest.raises(ConfigError, match=r"synthetic\.lesions\.ms\.volume_ml"):
        check_config(config)


def _records(n: int = 3) -> pd.DataFrame:
    metadata = {
        f"sub-{seed:03d}": generate_subject(
            seed=seed, lesion="stroke", sequences=("t1",), voxel_size_range=(2.5, 3.0)
        ).metadata
        for seed in range(n)
    }
    return lesion_volume_records(metadata)


def test_records_table_and_figure(tmp_path):
    records = _records()
    assert list(records["subject"]) == ["sub-000", "sub-001", "sub-002"]
    np.testing.assert_allclose(
        records["prevalence_percent"],
        100 * records["lesion_volume_ml"] / records["brain_volume_ml"],
    )
    assert (records["lesion_volume_ml"] > 0).all() and (records["lesion_components"] >= 1).all()
    published = PUBLISHED_VOLUMES["stroke"]
    comparison = volume_comparison(records["lesion_volume_ml"], published.quartiles, published)
    assert comparison.loc["median", "generated"] == pytest.approx(
        records["lesion_volume_ml"].median()
    )
    assert list(comparison.loc["median"])[1:] == [published.median_ml] * 2
    text = comparison_markdown("synth_atlas", "stroke", records, comparison)
    assert "| median |" in text and "Liew et al. 2022" in text
    inside = published.q1_ml <= records["lesion_volume_ml"].median() <= published.q3_ml
    assert ("inside" in text) == inside and ("**outside**" in text) == (not inside)
    fig = plot_lesion_volumes([Panel("synth_atlas", records["lesion_volume_ml"], (1, 5, 28))])
    save_png(fig, tmp_path / "qc.png")
    assert (tmp_path / "qc.png").stat().st_size > 5000


def test_records_refuse_old_metadata():
    with pytest.raises(InputError, match=r"sub-000.*generator version 3"):
        lesion_volume_records({"sub-000": {"lesion": "wmh", "lesion_volume_ml": 1.0}})
    with pytest.raises(InputError, match="no subjects"):
        volume_comparison([], (1, 2, 3), PUBLISHED_VOLUMES["wmh"])


@pytest.mark.slow
@pytest.mark.extended
def test_workflow_writes_the_lesion_volume_qc(tmp_path):
    """The real rule on the tiny config: generation of the lesion cohort, then its QC."""
    import subprocess
    import sys

    targets = [f"results/qc/lesion_volumes/synth_brats.{ext}" for ext in ("md", "csv", "png")]
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(tmp_path), "--configfile", str(ROOT / "config" / "tiny.yaml"),
        "--cores", "2", *targets,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = pd.read_csv(tmp_path / targets[1])
    n_subjects = _config("tiny.yaml")["datasets"]["synth_brats"]["n_subjects"]
    assert list(records["subject"]) == [f"sub-{i:03d}" for i in range(n_subjects)]
    metadata = [
        json.loads((tmp_path / f"results/standard/synth_brats/{s}/metadata.json").read_text())
        for s in records["subject"]
    ]
    assert all(m["generator_version"] == 3 for m in metadata)
    np.testing.assert_allclose(
        records["lesion_volume_ml"], [m["lesion_volume_ml"] for m in metadata]
    )
    # stratified: the smallest and the largest draw lie in the lowest and the highest
    # stratum of the volume distribution, on either side of its median
    published = PUBLISHED_VOLUMES["tumour"]
    drawn = sorted(records["drawn_volume_ml"])
    assert drawn[0] < published.median_ml < drawn[-1]
    table = (tmp_path / targets[0]).read_text()
    assert "synth_brats" in table and "| median |" in table
    assert (tmp_path / targets[2]).stat().st_size > 5000
