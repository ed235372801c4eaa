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


def _with_toy_methods(config: dict) -> dict:
    import toy_methods  # noqa: F401  (registers toy_weak and toy_two_stage)

    config["method_modules"] = ["toy_methods"]
    return config


def _without_lesion_train_split(config: dict) -> dict:
    """No lesion train split, and none of the shipped weakly supervised methods needing one."""
    from brainuad.methods import method_class

    config["splits"].pop("lesion_train_fraction", None)
    for name, spec in list(config["methods"].items()):
        if method_class(spec.get("method", name)).supervision == "image_labels":
            del config["methods"][name]
    return config


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["methods"]["ae"].update(inputs=["flair"]),
            r"methods.ae.inputs: 'flair' is not in slices.sequences",
        ),
        (
            lambda c: c["methods"]["ae"]["training"].update(max_epochs=3),
            r"methods.ae.training: give exactly one of max_steps and max_epochs",
        ),
        (
            lambda c: c["methods"]["ae"]["training"].update(stages={"pretrain": {}}),
            r"methods.ae.training.stages.pretrain: 'ae' has no such stage",
        ),
        (
            lambda c: c["methods"]["ae"]["training"].update(sampler="balanced"),
            r"methods.ae.training.sampler: 'balanced' needs slice labels",
        ),
        (
            lambda c: _without_lesion_train_split(_with_toy_methods(c))["methods"].update(
                weak={"method": "toy_weak", "training": {"max_steps": 2}}
            ),
            r"methods.weak: 'toy_weak' .* weakly supervised .* splits.lesion_train_fraction",
        ),
        (
            lambda c: (
                _with_toy_methods(c)["methods"].update(
                    weak={
                        "method": "toy_weak",
                        "train_datasets": ["x"],
                        "training": {"max_steps": 2},
                    }
                )
                or c["splits"].update(lesion_train_fraction=0.5)
            ),
            r"methods.weak.train_datasets: 'x' is not one of the datasets",
        ),
        (
            # a per-dataset fraction that leaves a cohort the method trains on without train
            lambda c: (
                _with_toy_methods(c)["methods"].update(
                    weak={"method": "toy_weak", "training": {"max_steps": 2}}
                )
                or c["splits"].update(lesion_train_fraction={"synth_brats": 0.0})
            ),
            r"methods.weak: .* train split of 'synth_brats', but "
            r"splits.lesion_train_fraction gives it \{'synth_brats': 0.0\}",
        ),
        (
            # a misspelt or healthy dataset in a per-dataset setting would get its default
            lambda c: c["splits"].update(lesion_train_fraction={"synth_brast": 0.5}),
            r"splits.lesion_train_fraction.synth_brast: not a lesion dataset of the study "
            r"\(lesion datasets: \['synth_brats'\]\)",
        ),
        (
            lambda c: c["splits"].update(lesion_val_subjects={"synth_ixi": 1}),
            r"splits.lesion_val_subjects.synth_ixi: not a lesion dataset",
        ),
    ],
)
def test_method_entries_are_checked_before_any_job(edit, message: str) -> None:
    config = copy.deepcopy(load("tiny.yaml"))
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_variants_of_one_implementation_are_valid() -> None:
    config = copy.deepcopy(load("tiny.yaml"))
    config["methods"]["ae_l2"] = {
        "method": "ae",
        "model": {**config["methods"]["ae"]["model"], "loss": "l2"},
        "training": dict(config["methods"]["ae"]["training"]),
    }
    validate(config, SCHEMA)
    check_config(config)


def test_lesion_train_fraction_per_dataset_is_valid_for_the_cohorts_trained_on() -> None:
    config = copy.deepcopy(load("config.yaml"))
    weak = [n for n, s in config["methods"].items() if s.get("train_datasets")]
    assert weak and all(config["methods"][n]["train_datasets"] == ["synth_brats"] for n in weak)
    config["splits"]["lesion_train_fraction"] = {"synth_brats": 0.4}
    validate(config, SCHEMA)
    check_config(config)
    config["splits"]["lesion_train_fraction"] = {"synth_brats": 1.0}
    with pytest.raises(Exception, match="lesion_train_fraction"):
        validate(config, SCHEMA)
