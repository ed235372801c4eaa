"""Checks of a study config that run when the workflow is parsed, before any job.

``snakemake -n`` fails, with one short line per problem, on what would otherwise surface
hours later inside a job (or, worse, after Snakemake deleted outputs it meant to rebuild):

- schema errors (:func:`validate_schema`): one line each, with the key's path in the config,
  what was wrong and what is allowed, instead of Snakemake's dump of schema and config;
- methods (:func:`method_errors`): every ``methods:`` entry names a registered
  implementation (``spec.get("method", key)``) and its ``model`` hyperparameters exist and
  have the constructor's types, checked against the signature, without building a network;
- the crop box (:func:`crop_box_errors`) against the template brain and ``slices.size``;
- paths the config names (:func:`path_errors`).

:func:`check_study_config` runs them all; ``rules/common.smk`` calls it.
"""

from __future__ import annotations

import collections.abc
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from brainuad.config import ConfigError, check_config
from brainuad.data.datasets import dataset_path

#: The crop box must keep at least this fraction of the template brain.
MIN_BRAIN_IN_BOX = 0.95
#: At the template's largest axial cross-section, brain must cover at least this fraction
#: of the (square) slice; a 256³ box at 3 mm gives 0.03 (97 % background).
MIN_SLICE_BRAIN_FRACTION = 0.25
#: Slices may be upsampled from the box by at most this factor (more only adds pixels).
MAX_UPSAMPLING = 2.0


def _path_of(error: Any) -> str:
    parts = [str(part) for part in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _allowed(error: Any) -> str:
    """What the schema allows where ``error`` happened, in a few words."""
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and "properties" in schema:
        return f"; allowed keys: {sorted(schema['properties'])}"
    if error.validator == "required":
        return ""
    if "description" in schema:
        return f" ({schema['description'].strip()})"
    return ""


def schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """One line per schema violation of ``config``: ``<path>: <what> [; allowed …]``."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    lines = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        # oneOf/anyOf errors: report the most specific sub-error.
        leaf = min(error.context, key=lambda e: -len(e.absolute_path)) if error.context else error
        lines.append(f"{_path_of(leaf)}: {leaf.message}{_allowed(leaf)}")
    return lines


def validate_schema(config: dict[str, Any], schema_path: str | os.PathLike) -> None:
    """Validate ``config`` against the schema and fill in its defaults (Snakemake's
    ``validate``); on failure raise a ConfigError of one line per problem."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema_path = Path(schema_path)
    try:
        validate(config, str(schema_path.resolve()))
    except WorkflowError as err:
        schema = yaml.safe_load(schema_path.read_text())
        lines = schema_errors(config, schema) or [str(err).splitlines()[0]]
        raise ConfigError(
            f"config does not match {schema_path}:\n" + "\n".join(f"  {line}" for line in lines)
        ) from None


# -- methods --------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a constructor type hint (unknown hints accept anything)."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (collections.abc.Sequence, list, tuple, collections.abc.Collection):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(item, args[0]) for item in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is not None:
        args = [_describe(a) for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {args[0]}" if args else "a list"
    return {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
        _type_name(hint), _type_name(hint)
    )


def method_config_errors(key: str, spec: dict[str, Any]) -> list[str]:
    """Problems of ``methods.<key>``: an unregistered implementation, unknown
    hyperparameters, or values of the wrong type (from the constructor's type hints)."""
    from brainuad.methods import available_methods, default_hparams, method_class

    name = spec.get("method", key)
    if name not in available_methods():
        where = f"methods.{key}.method" if "method" in spec else f"methods.{key}"
        return [f"{where}: method {name!r} is not registered; registered: {available_methods()}"]
    valid = default_hparams(name)
    hints = typing.get_type_hints(method_class(name).__init__)
    errors = []
    for hparam, value in (spec.get("model") or {}).items():
        where = f"methods.{key}.model.{hparam}"
        if hparam not in valid:
            errors.append(
                f"{where}: {name!r} has no hyperparameter {hparam!r}; valid: {sorted(valid)}"
            )
        elif hparam in hints and not _matches(value, hints[hparam]):
            errors.append(f"{where}: {value!r}, expected {_describe(hints[hparam])}")
    return errors


def method_errors(config: dict[str, Any]) -> list[str]:
    """One line per method entry that is not buildable by name, hyperparameter names and
    types (:func:`method_config_errors`); no network is built."""
    return [
        line
        for key, spec in config["methods"].items()
        for line in method_config_errors(key, spec or {})
    ]


# -- crop box -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _template_brain() -> np.ndarray:
    from brainuad.data.template import load_template_brainmask

    return load_template_brainmask(fill_holes=False)  # 1 mm isotropic, RAS


def crop_box_fractions(
    crop_shape: tuple[int, int, int], resolution_mm: float, brainmask: np.ndarray | None = None
) -> dict[str, float]:
    """How a crop box sits on the template brain (1 mm mask, RAS), as preprocessing places
    it: centred on the brain's bounding box.

    Returns:
        ``brain_in_box``: fraction of the template brain inside the box;
        ``slice_brain_fraction``: brain area over slice area at the largest axial
        cross-section, the slice squared as the slicer squares it (padded to the longer
        in-plane side).
    """
    mask = _template_brain() if brainmask is None else brainmask
    extent_mm = np.asarray(crop_shape, dtype=float) * resolution_mm
    coords = np.nonzero(mask)
    lo = np.array([c.min() for c in coords], dtype=float)
    hi = np.array([c.max() for c in coords], dtype=float)
    start = np.floor((lo + hi) / 2 - extent_mm / 2).astype(int)
    stop = start + np.round(extent_mm).astype(int)
    inside = mask[tuple(slice(max(a, 0), max(b, 0)) for a, b in zip(start, stop, strict=True))]
    side_mm = float(max(extent_mm[0], extent_mm[1]))
    largest_section = float(inside.sum(axis=(0, 1)).max()) if inside.size else 0.0
    return {
        "brain_in_box": float(inside.sum()) / float(mask.sum()),
        "slice_brain_fraction": largest_section / side_mm**2,
    }


def crop_box_errors(config: dict[str, Any], brainmask: np.ndarray | None = None) -> list[str]:
    """One line per problem of ``preprocess.crop_shape``: it cuts the template brain, leaves
    slices mostly background, or is so small that ``slices.size`` only upsamples it.

    Args:
        config: the study config.
        brainmask: a 1 mm RAS brain mask instead of the MNI152 template's (for tests).
    """
    pre = config["preprocess"]
    crop, resolution = tuple(pre["crop_shape"]), float(pre["resolution_mm"])
    size = int(config["slices"]["size"])
    fractions = crop_box_fractions(crop, resolution, brainmask)
    in_plane = max(crop[0], crop[1])
    where = f"preprocess.crop_shape {list(crop)} at {resolution:g} mm"
    errors = []
    # The cddpm pipeline's box is the reference's (192 x 192 x 100 at 1 mm: the central
    # 100 mm of the brain), which cuts the brain on purpose.
    reference_box = pre.get("pipeline") == "cddpm"
    if fractions["brain_in_box"] < MIN_BRAIN_IN_BOX and not reference_box:
        errors.append(
            f"{where} keeps {fractions['brain_in_box']:.1%} of the template brain, expected "
            f"≥ {MIN_BRAIN_IN_BOX:.0%}: enlarge the box"
        )
    if fractions["slice_brain_fraction"] < MIN_SLICE_BRAIN_FRACTION:
        errors.append(
            f"{where} gives slices whose brain fraction is {fractions['slice_brain_fraction']:.1%} "
            f"at the largest cross-section, expected ≥ {MIN_SLICE_BRAIN_FRACTION:.0%}: shrink "
            "the box towards the brain's extent"
        )
    if size > MAX_UPSAMPLING * in_plane:
        errors.append(
            f"slices.size {size}: the box is {in_plane} voxels in-plane, so slices would be "
            f"upsampled {size / in_plane:.1f}×, expected ≤ {MAX_UPSAMPLING:g}×"
        )
    return errors


# -- paths ----------------------------------------------------------------------------------

#: Config keys that name input files (``None`` means "not used").
PATH_KEYS = (("evaluation", "lpips_weights"), ("evaluation", "inception_weights"))


def path_errors(config: dict[str, Any], base: str | os.PathLike = ".") -> list[str]:
    """One line per configured input path that does not exist.

    The synthetic cohort needs no files; the weights files of the feature metrics do.
    Relative paths are taken from ``base`` (the directory Snakemake runs in).
    """
    errors = []
    for block, key in PATH_KEYS:
        value = config.get(block, {}).get(key)
        if value is not None and not (Path(base) / value).is_file():
            errors.append(f"{block}.{key}: {value} does not exist; expected a file, or null")
    for name in config["datasets"]:
        path = dataset_path(config, name)  # a relative path is below data_dir, if set
        if path is not None and not (Path(base) / path).exists():
            errors.append(f"datasets.{name}.path: {path} does not exist")
    return errors


def check_study_config(config: dict[str, Any], schema_path: str | os.PathLike) -> None:
    """Every check of this module and :func:`brainuad.config.check_config`.

    The schema comes first (it also fills in defaults, which the other checks read), then
    the cross-checks; then one ConfigError lists every method, crop-box and path problem.
    """
    validate_schema(config, schema_path)
    check_config(config)
    errors = method_errors(config) + crop_box_errors(config) + path_errors(config)
    if errors:
        raise ConfigError("\n".join(errors))
