"""Per-dataset settings of a study: the adapter's defaults under the dataset's own choices.

For dataset ``d`` the preprocessing settings are, key by key, the study's ``preprocess``
block, overridden by the adapter's defaults (what fits the download: BraTS is stripped
already, ATLAS is in MNI space and has only T1), overridden by ``datasets.d.preprocess``.
The sequences default to the study's sequences that the download has.
"""

from __future__ import annotations

import os
from typing import Any

from brainuad.config import ConfigError
from brainuad.data.adapters import ADAPTERS, Adapter, LabelConvention
from brainuad.data.adapters import synthetic as synthetic_adapter

# Preprocessing keys that are not arguments of brainuad.preprocess.preprocess_subject.
WORKFLOW_KEYS = ("sequences", "template")


def adapter_of(config: dict[str, Any], dataset: str) -> Adapter | None:
    """The adapter of ``dataset``, None for the synthetic cohort."""
    source = config["datasets"][dataset]["source"]
    return None if source == "synthetic" else ADAPTERS[source]


def dataset_path(config: dict[str, Any], dataset: str) -> str | None:
    """The dataset's folder: its ``path``, resolved against ``data_dir`` when relative."""
    path = config["datasets"][dataset].get("path")
    if path is None or os.path.isabs(path) or not config.get("data_dir"):
        return path
    return os.path.join(config["data_dir"], path)


def dataset_preprocess(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The effective preprocessing settings of ``dataset`` (see the module docstring)."""
    study = dict(config["preprocess"])
    adapter = adapter_of(config, dataset)
    own = dict(config["datasets"][dataset].get("preprocess", {}))
    settings = {**study, **(adapter.preprocess_defaults if adapter else {}), **own}
    adapter_defaults = adapter.preprocess_defaults if adapter else {}
    if "sequences" not in own and "sequences" not in adapter_defaults:
        available = adapter.sequences if adapter else study["sequences"]
        settings["sequences"] = [s for s in study["sequences"] if s in available]
    settings["sequences"] = list(settings["sequences"])
    if (
        "reference_sequence" not in own
        and settings.get("reference_sequence") not in settings["sequences"]
    ):
        settings["reference_sequence"] = settings["sequences"][0] if settings["sequences"] else None
    return settings


def dataset_sequences(config: dict[str, Any], dataset: str) -> list[str]:
    """Sequences ``dataset`` is preprocessed in, reference sequence first."""
    settings = dataset_preprocess(config, dataset)
    reference = settings["reference_sequence"]
    return [reference, *(s for s in settings["sequences"] if s != reference)]


def dataset_slice_sequences(config: dict[str, Any], dataset: str) -> list[str]:
    """Channels of the dataset's slice file: ``slices.sequences`` that it has, in order."""
    have = dataset_preprocess(config, dataset)["sequences"]
    return [s for s in config["slices"]["sequences"] if s in have]


def method_inputs(config: dict[str, Any], method: str) -> list[str]:
    """The sequences ``methods.<method>`` reads: its ``inputs``, default ``slices.sequences``."""
    return list(config["methods"][method].get("inputs") or config["slices"]["sequences"])


def scored_datasets(config: dict[str, Any], method: str) -> list[str]:
    """The datasets ``method`` is scored, calibrated and reported on: those whose slice
    files hold every sequence it reads (a T2 model is never asked to score ATLAS, which has
    T1 only; cDDPM Table 3 scores BraTS21 and MSLUB with T2 models, ATLAS and WMH with T1)."""
    inputs = set(method_inputs(config, method))
    return [d for d in config["datasets"] if inputs <= set(dataset_slice_sequences(config, d))]


def dataset_labels(config: dict[str, Any], dataset: str) -> LabelConvention | None:
    """Label convention of ``dataset`` (None for a healthy real dataset without labels)."""
    adapter = adapter_of(config, dataset)
    spec = config["datasets"][dataset]
    if adapter is None:
        return None if spec["lesion"] == "none" else synthetic_adapter.LABELS
    return adapter.labels_for(spec["lesion"], spec.get("layout"))


def preprocess_arguments(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Keyword arguments of brainuad.preprocess.preprocess_subject for ``dataset``."""
    settings = dataset_preprocess(config, dataset)
    return {k: v for k, v in settings.items() if k not in WORKFLOW_KEYS}


def check_datasets(config: dict[str, Any]) -> None:
    """Raise ConfigError, naming the key, where a dataset's settings cannot work."""
    for name, spec in config["datasets"].items():
        where = f"datasets.{name}"
        adapter = adapter_of(config, name)
        if adapter is None:
            if "n_subjects" not in spec:
                raise ConfigError(f"{where}.n_subjects: required for synthetic datasets")
        else:
            if not spec.get("path"):
                raise ConfigError(f"{where}.path: required for source '{adapter.name}'")
            if not adapter.mixed and (adapter.labels is None) != (spec["lesion"] == "none"):
                raise ConfigError(
                    f"{where}.lesion: '{spec['lesion']}' does not fit source '{adapter.name}' "
                    f"({'no' if adapter.labels is None else 'has'} lesion labels)"
                )
        layout = spec.get("layout") or {}
        allowed = adapter.options if adapter else ()
        if layout and not set(layout) <= set(allowed):
            unknown = sorted(set(layout) - set(allowed))
            raise ConfigError(
                f"{where}.layout: {unknown} not understood by source '{spec['source']}' "
                f"(it takes {list(allowed) or 'no layout options'})"
            )
        settings = dataset_preprocess(config, name)
        available = adapter.sequences if adapter else config["preprocess"]["sequences"]
        unknown = [s for s in settings["sequences"] if s not in available]
        if unknown or not settings["sequences"]:
            raise ConfigError(
                f"{where}.preprocess.sequences: {settings['sequences']} must be a non-empty "
                f"subset of what source '{spec['source']}' provides {list(available)}"
            )
        if settings["reference_sequence"] not in settings["sequences"]:
            raise ConfigError(
                f"{where}.preprocess.reference_sequence: '{settings['reference_sequence']}' "
                f"is not one of its sequences {settings['sequences']}"
            )
        if not dataset_slice_sequences(config, name):
            raise ConfigError(
                f"{where}: none of slices.sequences {config['slices']['sequences']} is "
                f"among its sequences {settings['sequences']}"
            )
        if settings.get("skullstrip_method") == "hdbet" and not settings.get("hdbet_weights"):
            raise ConfigError(
                f"{where}.preprocess.hdbet_weights: skullstrip_method hdbet needs the path of "
                "the HD-BET weights (a folder with 0.model ... 4.model); none given"
            )
