"""Checks of a study config that a JSON schema cannot express, and derived names.

The schema (``config/schema.yaml``) checks types and refuses unknown keys; this module
checks how the blocks fit together, with errors that name the offending key.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """The study config is inconsistent; the message names the key and the expected value."""


def check_config(config: dict[str, Any]) -> None:
    """Raise ConfigError unless the blocks of ``config`` agree with each other."""
    datasets = config["datasets"]
    healthy = config["healthy_dataset"]
    if healthy not in datasets:
        raise ConfigError(
            f"healthy_dataset: '{healthy}' is not one of the datasets {sorted(datasets)}"
        )
    if datasets[healthy]["lesion"] != "none":
        raise ConfigError(
            f"healthy_dataset: '{healthy}' has lesion '{datasets[healthy]['lesion']}', "
            "expected a healthy cohort (lesion: none)"
        )
    for name, spec in datasets.items():
        if spec["source"] == "synthetic" and "n_subjects" not in spec:
            raise ConfigError(f"datasets.{name}.n_subjects: required for synthetic datasets")
    sequences = config["preprocess"]["sequences"]
    reference = config["preprocess"].get("reference_sequence", "t1")
    if reference not in sequences:
        raise ConfigError(
            f"preprocess.reference_sequence: '{reference}' must be one of "
            f"preprocess.sequences {sequences}"
        )
    for sequence in config["slices"]["sequences"]:
        if sequence not in sequences:
            raise ConfigError(
                f"slices.sequences: '{sequence}' is not preprocessed; "
                f"add it to preprocess.sequences {sequences}"
            )
    # Per-dataset settings: sources, folders, sequences, skull-strippers (adapter defaults).
    from brainuad.data.datasets import check_datasets  # imports this module

    check_datasets(config)
    protocol = config["evaluation"].get("default_protocol", "healthy_fpr_5")
    valid = calibration_protocols(config)
    if protocol not in valid:
        raise ConfigError(f"evaluation.default_protocol: '{protocol}' is not one of {valid}")


def healthy_fpr_protocol(fpr: float) -> str:
    """Name of the healthy-FPR protocol at ``fpr`` (0.05 -> 'healthy_fpr_5')."""
    percent = fpr * 100
    return f"healthy_fpr_{percent:g}".replace(".", "p")


def calibration_protocols(config: dict[str, Any]) -> list[str]:
    """Names of every calibration protocol the study computes."""
    evaluation = config["evaluation"]
    names = [healthy_fpr_protocol(f) for f in evaluation.get("healthy_fprs", [0.05, 0.01])]
    if evaluation.get("best_dice_on_validation", True):
        names.append("best_dice_val")
    return names


def synthetic_subjects(n_subjects: int) -> list[str]:
    """Subject identifiers of a synthetic dataset: sub-000, sub-001, ..."""
    return [f"sub-{index:03d}" for index in range(n_subjects)]
