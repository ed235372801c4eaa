"""Both execution profiles give a GPU to every job that runs a network, whatever its rule."""

from __future__ import annotations

import pytest
import yaml
from workflow_rules import ROOT, network_rules, rule_scripts

PROFILES = [ROOT / "slurm" / "config.v8+.yaml", ROOT / "profiles" / "gpu" / "config.v8+.yaml"]


def test_network_rules_are_found_by_what_their_scripts_do():
    rules = network_rules()
    assert {"train_model", "train_stage", "score_dataset"} <= rules
    assert "subject_metrics" in rule_scripts() and "subject_metrics" not in rules


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.parent.name)
def test_every_network_job_asks_for_a_gpu(profile):
    settings = yaml.safe_load(profile.read_text())
    resources = settings.get("set-resources", {})
    for rule in sorted(network_rules()):
        assert int(resources.get(rule, {}).get("gpu", 0)) == 1, (profile, rule)
    cpu_rules = set(rule_scripts()) - network_rules()
    assert not any("gpu" in resources.get(rule, {}) for rule in cpu_rules)
