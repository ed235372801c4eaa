"""The mutation-testing driver (``brainuad.bench.mutation``): which tests it runs against
which module, how it reruns survivors, and how it writes the scores table. mutmut itself is
replaced by a recording script (a real run takes minutes: ``make mutation``)."""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib
import types
from pathlib import Path

import pytest

from brainuad.bench import mutation
from brainuad.bench.mutation import (
    TABLE_END,
    TABLE_START,
    UNIT_TESTS,
    ModuleScore,
    equivalent_names,
    run_module,
    slug,
    update_doc,
    work_pyproject,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_listed_module_and_unit_test_exists() -> None:
    """A renamed test file or test would silently drop out of a module's run."""
    for module, tests in UNIT_TESTS.items():
        assert (ROOT / "src/brainuad" / module).is_file(), module
        for test in tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), test
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), test
    core = {"evaluation/metrics.py", "slices/splits.py", "training/loop.py", "methods/base.py"}
    assert core <= set(UNIT_TESTS)


def test_work_pyproject_narrows_mutmut_to_the_module_and_its_tests() -> None:
    config = tomllib.loads(work_pyproject(ROOT, "slices/splits.py", ["tests/a.py", "tests/b.py"]))
    mutmut_config = config["tool"]["mutmut"]
    assert mutmut_config["only_mutate"] == ["src/brainuad/slices/splits.py"]
    assert mutmut_config["pytest_add_cli_args_test_selection"] == ["tests/a.py", "tests/b.py"]
    assert mutmut_config["source_paths"] == ["src"]
    assert {"tests", "config"} <= set(mutmut_config["also_copy"])
    assert mutmut_config["timeout_multiplier"] == 60.0  # the repository's own setting
    assert slug("evaluation/postprocess.py") == "evaluation.postprocess"


def test_scores_and_the_table() -> None:
    score = ModuleScore("m.py", ["tests/t.py::x", "tests/t.py::y"], 6, 3, 1, 2, 12, 2)
    assert score.score == 8 / 12 and score.adjusted == 8 / 10
    row = mutation.table_row(score, "2026-12-01", "abc")
    assert row == "| `m.py` | `t.py` | 6 | 3 | 1 | 2 | 12 | 67% | 80% | 2026-12-01 | abc |"


def test_update_doc_replaces_the_rows_run_and_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "testing.md"
    doc.write_text(
        f"intro\n{TABLE_START}\nLast run: `old`\n\n| h |\n|---|\n"
        "| `b.py` | old b |\n| `c.py` | c |\n"
        f"{TABLE_END}\n## Equivalent survivors\n\n- `brainuad.b.x_f__mutmut_3` (why)\n"
        "## Next\n- `brainuad.b.x_f__mutmut_9`\n"
    )
    update_doc(doc, {"a.py": "| `a.py` | a |", "b.py": "| `b.py` | new b |"}, "make x")
    text = doc.read_text()
    block = text.split(TABLE_START)[1].split(TABLE_END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows == ["| `a.py` | a |", "| `b.py` | new b |", "| `c.py` | c |"]
    assert "Last run: `make x`" in block and "old" not in block
    assert text.startswith("intro\n") and text.endswith("- `brainuad.b.x_f__mutmut_9`\n")
    # only names under the equivalents heading, up to the next section, count
    assert equivalent_names(doc) == {"brainuad.b.x_f__mutmut_3"}


def fake_mutmut(tmp_path: Path) -> Path:
    """A stand-in for mutmut: records its arguments, environment and whether the test map
    (``mutmut-stats.json``) was there, then writes the results a run leaves."""
    script = tmp_path / "mutmut"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "record = {'args': sys.argv[1:], 'omp': os.environ.get('OMP_NUM_THREADS'),\n"
        "          'stats': Path('mutants/mutmut-stats.json').exists()}\n"
        "Path('calls.jsonl').open('a').write(json.dumps(record) + '\\n')\n"
        "meta = Path('mutants/src/brainuad/slices/splits.py.meta')\n"
        "meta.parent.mkdir(parents=True, exist_ok=True)\n"
        "codes = {'m__mutmut_1': 1, 'm__mutmut_2': 0, 'm__mutmut_3': 0, 'm__mutmut_4': 33}\n"
        "if len(sys.argv) > 4:  # a rerun of named mutants: the new tests kill mutant 2\n"
        "    codes = json.loads(meta.read_text())['exit_code_by_key'] | {'m__mutmut_2': 1}\n"
        "meta.write_text(json.dumps({'exit_code_by_key': codes}))\n"
        "Path('mutants/mutmut-stats.json').write_text('{}')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def mutmut_exit_codes(monkeypatch) -> None:
    """mutmut's own exit-code meanings where it is installed (``make mutation``); where it is
    not (CI installs the test extra only), the three this test uses, as mutmut 3 has them."""
    try:
        import mutmut.stats  # noqa: F401
    except ImportError:
        stats = types.ModuleType("mutmut.stats")
        stats.status_by_exit_code = {0: "survived", 1: "killed", 33: "no tests"}
        monkeypatch.setitem(sys.modules, "mutmut", types.ModuleType("mutmut"))
        monkeypatch.setitem(sys.modules, "mutmut.stats", stats)


def test_run_then_rerun_survivors_then_reuse(tmp_path: Path, monkeypatch) -> None:
    mutmut_exit_codes(monkeypatch)
    root = tmp_path / "repo"
    for name in ("src/brainuad/slices", "tests", "config"):
        (root / name).mkdir(parents=True)
    (root / "src/brainuad/slices/splits.py").write_text("x = 1\n")
    (root / "tests/test_splits.py").write_text("")
    (root / "pyproject.toml").write_text("[tool.mutmut]\ntimeout_multiplier = 60.0\n")
    monkeypatch.setattr(mutation, "UNIT_TESTS", {"slices/splits.py": ["tests/test_splits.py"]})
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    mutmut = str(fake_mutmut(tmp_path))
    work = root / ".mutation/slices.splits"

    first = run_module(root, "slices/splits.py", 1, {"m__mutmut_3"}, mutmut)
    assert (first.killed, first.survived, first.no_tests, first.total) == (1, 2, 1, 4)
    assert first.equivalent == 1
    assert (work / "survivors.txt").read_text().split() == [
        "m__mutmut_2",
        "m__mutmut_3",
        "m__mutmut_4",
    ]
    assert os.readlink(work / "tests") == str(root / "tests")

    again = run_module(root, "slices/splits.py", 1, set(), mutmut, rerun_survivors=True)
    assert (again.killed, again.survived, again.no_tests) == (2, 1, 1)
    calls = [json.loads(line) for line in (work / "calls.jsonl").read_text().splitlines()]
    assert calls[0]["args"] == ["run", "--max-children", "1"]
    assert calls[1]["args"] == [
        "run",
        "--max-children",
        "1",
        "m__mutmut_2",
        "m__mutmut_3",
        "m__mutmut_4",
    ]
    assert not calls[1]["stats"]  # the test map is made afresh for the changed tests
    assert {c["omp"] for c in calls} == {"1"}  # single-threaded, whatever the caller's

    reused = run_module(root, "slices/splits.py", 1, set(), mutmut, reuse=True)
    assert reused == again
    assert len((work / "calls.jsonl").read_text().splitlines()) == 2  # nothing run
    with pytest.raises(SystemExit, match="no unit tests listed"):
        run_module(root, "slices/other.py", 1, set(), mutmut)
