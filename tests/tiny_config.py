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
