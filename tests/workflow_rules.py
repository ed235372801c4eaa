"""What the workflow's rules do, read from rules/*.smk and their scripts (for the tests)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.MULTILINE | re.DOTALL)
_SCRIPT = re.compile(r'script:\s*\n\s*"\.\./(workflow_scripts/[\w.]+)"')
# What a script does when it runs a network: trains a stage or scores a method.
_NETWORK_ENTRY_POINTS = ("brainuad.training.fold", "brainuad.scoring", "brainuad.methods.anofpdm")


def rule_scripts() -> dict[str, Path]:
    """Rule name -> the script it runs, for every rule with a `script:`."""
    scripts = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for name, body in _RULE.findall(smk.read_text()):
            match = _SCRIPT.search(body)
            if match:
                scripts[name] = ROOT / match.group(1)
    return scripts


def network_rules() -> set[str]:
    """Rules whose script trains or scores a method: the jobs that need a GPU."""
    return {
        name
        for name, script in rule_scripts().items()
        if any(f"from {module} import" in script.read_text() for module in _NETWORK_ENTRY_POINTS)
    }
