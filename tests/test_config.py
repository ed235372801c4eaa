"""The study configs validate against the schema, and bad configs name the bad key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from brainuad.config import ConfigError, calibration_protocols, check_config, healthy_fpr_protocol

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config" / "schema.yaml")
CONFIGS = sorted(p for p in (ROOT / "config").glob("*.yaml") if not p.name.endswith("schema.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_shipped_configs_are_valid(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    validate(config, SCHEMA)
    check_config(config)


def test_unknown_key_is_named() -> None:
    config = load("tiny.yaml")
    config["preprocess"]["resolutoin_mm"] = 2.0
    with pytest.raises(WorkflowError, match="resolutoin_mm"):
        validate(config, SCHEMA)


def test_wrong_type_is_reported() -> None:
    config = load("tiny.yaml")
    config["slices"]["size"] = "big"
    with pytest.raises(WorkflowError, match="'big' is not of type 'integer'"):
        validate(config, SCHEMA)


def test_schema_fills_defaults() -> None:
    config = load("tiny.yaml")
    del config["preprocess"]["registration_type"]
    validate(config, SCHEMA)
    assert config["preprocess"]["registration_type"] == "Affine"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(healthy_dataset="nope"), "healthy_dataset: 'nope'"),
        (lambda c: c.update(healthy_dataset="synth_brats"), "expected a healthy cohort"),
        (lambda c: c["slices"].update(sequences=["flair"]), "slices.sequences: 'flair'"),
        (
            lambda c: c["preprocess"].update(reference_sequence="flair"),
            "preprocess.reference_sequence",
        ),
        (
            lambda c: c["evaluation"].update(default_protocol="best_dice_test"),
            "evaluation.default_protocol",
        ),
    ],
)
def test_inconsistent_config_names_the_key(edit, message: str) -> None:
    config = copy.deepcopy(load("tiny.yaml"))
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_protocol_names() -> None:
    assert healthy_fpr_protocol(0.05) == "healthy_fpr_5"
    assert healthy_fpr_protocol(0.01) == "healthy_fpr_1"
    assert healthy_fpr_protocol(0.005) == "healthy_fpr_0p5"
    assert calibration_protocols(load("tiny.yaml")) == [
        "healthy_fpr_5",
        "healthy_fpr_1",
        "best_dice_val",
    ]
