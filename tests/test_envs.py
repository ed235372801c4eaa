"""The conda environments in envs/ pin exactly the versions of pyproject.toml.

One source of truth for versions: pyproject.toml. Every package an env file names (conda or
its pip section) must be a pinned dependency there, at the same version; only the
interpreter and pip itself are exempt.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))
# Conda packages that are not Python dependencies of brainuad.
NOT_IN_PYPROJECT = {"python", "pip"}
# `name==1.2.3` (pip, pyproject), `name==1.2.3` or `name=1.2.3` (conda), or a bare name.
SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:(==|=)\s*([^\s;#]+))?\s*$")


def normalise(name: str) -> str:
    """PEP 503 name: case-insensitive, with runs of `-`, `_` and `.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_spec(spec: str, where: str) -> tuple[str, str | None]:
    """Split `name==version` into (normalised name, version or None)."""
    match = SPEC.match(spec)
    if match is None:
        raise AssertionError(f"{where}: cannot read dependency {spec!r}; expected name==version")
    name, _, version = match.groups()
    return normalise(name), version


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    pins = {}
    for spec in specs:
        name, version = parse_spec(spec, "pyproject.toml")
        assert version is not None, f"pyproject.toml: {name} is not pinned with =="
        pins[name] = version
    return pins


def env_dependencies(path: Path) -> list[tuple[str, str | None, str]]:
    """(name, version, section) for every conda and pip dependency of an env file."""
    env = yaml.safe_load(path.read_text())
    found = []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            assert set(entry) == {"pip"}, f"{path.name}: unexpected mapping {entry!r}"
            for spec in entry["pip"]:
                found.append((*parse_spec(spec, f"{path.name} pip"), "pip"))
        else:
            found.append((*parse_spec(entry, path.name), "conda"))
    return found


def test_env_files_exist() -> None:
    names = {path.name for path in ENV_FILES}
    assert {"preprocessing.yaml", "torch.yaml", "reporting.yaml"} <= names


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda path: path.name)
def test_env_pins_match_pyproject(path: Path) -> None:
    pins = pyproject_pins()
    for name, version, section in env_dependencies(path):
        if name in NOT_IN_PYPROJECT:
            continue
        assert name in pins, (
            f"envs/{path.name} ({section}): {name} is not a dependency in pyproject.toml"
        )
        assert version == pins[name], (
            f"envs/{path.name} ({section}): {name}=={version}, pyproject.toml pins "
            f"{name}=={pins[name]}"
        )


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda path: path.name)
def test_torch_comes_from_pip(path: Path) -> None:
    # conda's pytorch next to pip's would give two torches; the pinned one is PyPI's.
    for name, _, section in env_dependencies(path):
        if name in {"torch", "pytorch", "monai", "deepbet"}:
            assert section == "pip", f"envs/{path.name}: {name} must be in the pip section"


def test_python_matches_requires_python() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.search(r">=\s*3\.(\d+)", requires)
    high = re.search(r"<\s*3\.(\d+)", requires)
    assert low and high, f"pyproject.toml: requires-python {requires!r} has no bounds"
    for path in ENV_FILES:
        pythons = [v for n, v, _ in env_dependencies(path) if n == "python"]
        assert pythons, f"envs/{path.name}: no python pin"
        minor = int(pythons[0].split(".")[1])
        assert int(low.group(1)) <= minor < int(high.group(1)), (
            f"envs/{path.name}: python={pythons[0]} is outside requires-python {requires!r}"
        )
