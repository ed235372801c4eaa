"""config/tiny.yaml for tests that replace its datasets."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY = Path(__file__).resolve().parents[1] / "config" / "tiny.yaml"


def tiny_config_for_other_datasets() -> dict:
    """config/tiny.yaml without its weakly supervised methods (they train on synth_brats'
    train split) and without a lesion train split, for a test that brings its own datasets."""
    config = yaml.safe_load(TINY.read_text())
    config["methods"] = {k: v for k, v in config["methods"].items() if "train_datasets" not in v}
    config["splits"].pop("lesion_train_fraction", None)
    return config


SEED_METHODS = Path(__file__).resolve().parent / "config" / "seed_methods.yaml"


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base`` key by key (mappings recursively), as Snakemake merges
    several config files."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config_with_seed_methods() -> dict:
    """config/tiny.yaml with tests/config/seed_methods.yaml (the seed methods at test size)."""
    return merged(yaml.safe_load(TINY.read_text()), yaml.safe_load(SEED_METHODS.read_text()))
