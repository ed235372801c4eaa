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
    for kind, settings in config.get("synthetic", {}).get("lesions", {}).items():
        volume = settings.get("volume_ml")
        if volume is not None and not volume["q1"] <= volume["median"] <= volume["q3"]:
            raise ConfigError(
                f"synthetic.lesions.{kind}.volume_ml: expected q1 <= median <= q3, got {volume}"
            )
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
    # Per-dataset split settings: a misspelt name would silently get the default.
    for key in ("lesion_val_subjects", "lesion_train_fraction"):
        per_dataset = config["splits"].get(key)
        for name in per_dataset if isinstance(per_dataset, dict) else {}:
            if name not in datasets or datasets[name]["lesion"] == "none":
                lesion = sorted(d for d, spec in datasets.items() if spec["lesion"] != "none")
                raise ConfigError(
                    f"splits.{key}.{name}: not a lesion dataset of the study "
                    f"(lesion datasets: {lesion})"
                )
    check_methods(config)
    # Per-dataset settings: sources, folders, sequences, skull-strippers (adapter defaults).
    from brainuad.data.datasets import check_datasets  # imports this module

    check_datasets(config)
    protocol = config["evaluation"].get("default_protocol", "healthy_fpr_5")
    valid = calibration_protocols(config)
    if protocol not in valid:
        raise ConfigError(f"evaluation.default_protocol: '{protocol}' is not one of {valid}")


def check_methods(config: dict[str, Any]) -> None:
    """Raise ConfigError unless every entry of ``methods`` fits its implementation and the
    data: a registered implementation, inputs among the sliced sequences, a training length
    per stage, stage overrides naming real stages, and, for weakly supervised stages,
    lesion cohorts with a train split to learn from."""
    from brainuad.data.datasets import dataset_slice_sequences, method_inputs
    from brainuad.errors import InputError
    from brainuad.methods.registry import available_methods, import_method_modules, method_class
    from brainuad.slices.splits import lesion_train_fraction

    import_method_modules(config.get("method_modules", []))
    datasets = config["datasets"]
    healthy = config["healthy_dataset"]
    sliced = config["slices"]["sequences"]
    for name, spec in config["methods"].items():
        where = f"methods.{name}"
        implementation = spec.get("method", name)
        if implementation not in available_methods():
            continue  # named by brainuad.config_checks.method_errors, with the valid names
        cls = method_class(implementation)
        for sequence in spec.get("inputs") or []:
            if sequence not in sliced:
                raise ConfigError(
                    f"{where}.inputs: '{sequence}' is not in slices.sequences {sliced}"
                )
        inputs = method_inputs(config, name)
        for dataset in (healthy, *spec.get("train_datasets", [])):
            have = dataset_slice_sequences(config, dataset) if dataset in datasets else inputs
            if not set(inputs) <= set(have):
                raise ConfigError(
                    f"{where}.inputs: reads {inputs}, but the slices of '{dataset}' (which "
                    f"it trains on) hold {have}; set `inputs` to sequences it has"
                )
        training = dict(spec.get("training", {}))
        overrides = training.pop("stages", {}) or {}
        stage_names = [stage.name for stage in cls.stages]
        for stage_name, settings in overrides.items():
            if stage_name not in stage_names:
                raise ConfigError(
                    f"{where}.training.stages.{stage_name}: '{implementation}' has no such "
                    f"stage; its stages: {stage_names}"
                )
            if "stages" in settings:
                raise ConfigError(f"{where}.training.stages.{stage_name}.stages: not allowed")
        for stage in cls.stages:
            settings = training | overrides.get(stage.name, {})
            key = f"{where}.training" + (f".stages.{stage.name}" if stage.name in overrides else "")
            if ("max_steps" in settings) == ("max_epochs" in settings):
                raise ConfigError(
                    f"{key}: give exactly one of max_steps and max_epochs "
                    f"(stage '{stage.name}' of '{implementation}')"
                )
            if settings.get("augmentation") is not None:
                from brainuad.augment import build_intensity_augmentation

                try:
                    build_intensity_augmentation(settings["augmentation"])
                except InputError as error:
                    raise ConfigError(f"{key}.{error}") from None
            weak = cls.stage_supervision(stage.name) == "image_labels"
            if settings.get("sampler") == "balanced" and not weak:
                raise ConfigError(
                    f"{key}.sampler: 'balanced' needs slice labels, but stage '{stage.name}' "
                    f"of '{implementation}' trains on healthy slices only"
                )
            if not weak:
                continue
            lesion_cohorts = [
                d
                for d in spec.get("train_datasets") or list(datasets)
                if d in datasets and d != healthy and datasets[d]["lesion"] != "none"
            ]
            for dataset in lesion_cohorts:
                if not lesion_train_fraction(config["splits"], dataset) > 0:
                    raise ConfigError(
                        f"{where}: '{implementation}' (stage '{stage.name}') is weakly "
                        f"supervised and trains on the train split of '{dataset}', but "
                        "splits.lesion_train_fraction gives it "
                        f"{config['splits'].get('lesion_train_fraction', 0)}; set it > 0 "
                        "(or leave the cohort out of train_datasets)"
                    )
        for dataset in spec.get("train_datasets", []):
            if dataset not in datasets:
                raise ConfigError(
                    f"{where}.train_datasets: '{dataset}' is not one of the datasets "
                    f"{sorted(datasets)}"
                )
            if dataset != healthy and datasets[dataset]["lesion"] == "none":
                raise ConfigError(
                    f"{where}.train_datasets: '{dataset}' is a healthy cohort other than "
                    f"healthy_dataset '{healthy}'; it has no train split"
                )


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


def evaluation_grid(config: dict[str, Any]) -> dict[str, Any]:
    """The ``brainuad.evaluation.grid.EvaluationConfig`` of the study, as a dict: the mode
    (``evaluation.mode``), the reference grid (``evaluation.reference_grid``) and the slice
    file's geometry it starts from (``preprocess.resolution_mm`` between slices and
    ``preprocess.crop_shape[2]`` slices along the slice axis of the cropped RAS volume)."""
    evaluation = config["evaluation"]
    reference = evaluation.get("reference_grid") or {}
    return {
        "mode": evaluation.get("mode", "brain_mask"),
        "extent_mm": float(reference.get("extent_mm", 100.0)),
        "slice_spacing_mm": float(reference.get("slice_spacing_mm", 2.0)),
        "source_spacing_mm": float(config["preprocess"]["resolution_mm"]),
        "depth": int(config["preprocess"]["crop_shape"][2]),
    }


def main_table_protocols(config: dict[str, Any]) -> list[str]:
    """Threshold protocols of the main table: ``evaluation.default_protocol`` first, then one
    of the other kind, so label-free (healthy FPR) and label-using (best Dice on the lesion
    validation split) thresholds stand side by side: ``best_dice_val`` after a healthy-FPR
    headline (when computed), the first of ``evaluation.healthy_fprs`` after a best-Dice
    headline."""
    evaluation = config["evaluation"]
    default = evaluation.get("default_protocol", "healthy_fpr_5")
    protocols = [default]
    if default == "best_dice_val":
        fprs = evaluation.get("healthy_fprs", [0.05, 0.01])
        if fprs:
            protocols.append(healthy_fpr_protocol(fprs[0]))
    elif "best_dice_val" in calibration_protocols(config):
        protocols.append("best_dice_val")
    return protocols
