"""Mutation testing of chosen modules with mutmut, each against its own unit tests only.

Run as ``python -m brainuad.bench.mutation evaluation/postprocess.py slices/splits.py``
(``make mutation MODULES="..."``). For each module (a path under ``src/brainuad/``) it writes
a work folder ``.mutation/<module>/`` holding links to ``src`` and ``tests`` and a
``pyproject.toml`` whose ``[tool.mutmut]`` is the repository's, narrowed to that module
(``only_mutate``) and to its unit tests (``UNIT_TESTS``), runs ``mutmut run`` there, and
writes the counts into the scores table of ``docs/testing.md`` with the date, the commit and
the command. The surviving mutants' names go to ``.mutation/<module>/survivors.txt``
(``mutmut show NAME`` in that folder prints one's diff).

The score is (killed + timed out) / all mutants; mutants that no selected test reaches count
as survivors. The adjusted score leaves out the survivors listed as equivalent (no
observable difference) in ``docs/testing.md``, each under its full mutmut name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_CFG_FAST = (
    "guided_epsilon_formula_and_w0_is_the_conditional",
    "batched_pair_equals_separate_conditional_and_null_calls",
    "null_embedding_is_zero_and_stays_untrained",
    "ddim_encode_decode_without_guidance_reconstructs",
    "streaming_aggregation_equals_full_memory",
    "forward_process_equals_the_transcribed_reference_loop",
    "anofpdm_costs_two_evaluations_per_step_in_one_call",
    "ddib_costs_one_encoding_and_two_decoding_evaluations_per_step",
    "ddib_map_is_the_median_filtered_squared_error_of_its_translation",
    "aggregator_state_does_not_grow_with_steps",
    "select_constants_from_image_labels",
    "slice_thresholds_pick_the_quantile_from_the_difference",
    "selection_reads_no_pixel_label",
    "map_settings_are_checked",
)
# The classifier-free guided methods' unit tests (shared by the three modules).
CFG_TESTS = [
    *(f"tests/test_cfg_diffusion.py::test_{name}" for name in _CFG_FAST),
    "tests/test_cfg_diffusion_definitions.py",
    "tests/test_ddib_definitions.py",
    "tests/test_anofpdm_definitions.py",
]

# Each core module's own unit tests: the files whose tests are written for it (mutmut runs,
# for each mutant, only those of these tests that execute the mutated function).
UNIT_TESTS: dict[str, list[str]] = {
    "evaluation/postprocess.py": [
        "tests/test_postprocess.py",
        "tests/test_postprocess_definitions.py",
    ],
    # test_evaluation_modes.py: the reference mode's bisection search and per-slice FPR threshold
    "evaluation/metrics.py": [
        "tests/test_metrics.py",
        "tests/test_metrics_definitions.py",
        "tests/test_evaluation_modes.py",
    ],
    "evaluation/calibration.py": [
        "tests/test_calibration.py",
        "tests/test_calibration_definitions.py",
        "tests/test_evaluation_modes.py",
    ],
    "evaluation/aggregate.py": ["tests/test_aggregate.py", "tests/test_aggregate_definitions.py"],
    "evaluation/tables.py": ["tests/test_tables.py", "tests/test_tables_definitions.py"],
    "slices/splits.py": ["tests/test_splits.py", "tests/test_splits_definitions.py"],
    "slices/extract.py": ["tests/test_slices.py", "tests/test_slices_definitions.py"],
    "slices/hdf5.py": ["tests/test_slices.py", "tests/test_slices_definitions.py"],
    # test_preprocess.py runs the whole pipeline (ANTs registration) too: its unit tests only
    "preprocess/normalise.py": [
        "tests/test_preprocess.py::test_percentile_normalise_maps_brain_to_unit_interval",
        "tests/test_preprocess_definitions.py",
    ],
    "preprocess/crop.py": [
        "tests/test_preprocess.py::test_crop_or_pad_shape_and_world_coordinates",
        "tests/test_preprocess.py::test_brain_box_centre",
        "tests/test_preprocess_definitions.py",
    ],
    "methods/intensity.py": ["tests/test_intensity_definitions.py"],
    "methods/pddpm.py": ["tests/test_pddpm.py", "tests/test_pddpm_definitions.py"],
    "methods/anoddpm.py": ["tests/test_anoddpm.py", "tests/test_anoddpm_definitions.py"],
    "methods/autoddpm.py": ["tests/test_autoddpm.py", "tests/test_autoddpm_definitions.py"],
    # test_cddpm.py less its benchmark test (it times both stages through bench.steps)
    "methods/cddpm.py": [
        "tests/test_cddpm.py::test_stages_spark_feeds_model_and_nossl_has_none",
        "tests/test_cddpm.py::test_condition_is_concatenated_changes_output_and_receives_gradients",
        "tests/test_cddpm.py::test_encoder_loads_spark_weights_but_not_fc_or_head",
        "tests/test_cddpm.py::test_stage_parameters_and_optimisers",
        "tests/test_cddpm.py::test_masked_cell_loss_ignores_visible_cells",
        "tests/test_cddpm.py::test_random_active_cells_keep_35_percent",
        "tests/test_cddpm.py::test_sparse_batch_norm_uses_visible_positions_only",
        "tests/test_cddpm.py::test_sparse_mode_zeroes_masked_positions_and_restores_the_dense_encoder",
        "tests/test_cddpm.py::test_spark_loss_trains_the_encoder",
        "tests/test_cddpm.py::test_spark_refuses_sizes_off_the_cell_grid",
        "tests/test_cddpm.py::test_ensemble_is_one_batch_with_the_encoding_computed_once",
        "tests/test_cddpm.py::test_invalid_hparams_are_named",
        "tests/test_cddpm_definitions.py",
    ],
    "methods/wolleb.py": [
        "tests/test_wolleb.py",
        "tests/test_wolleb_definitions.py",
        "tests/test_ema_methods.py",
    ],
    "methods/dae.py": ["tests/test_dae.py", "tests/test_dae_definitions.py"],
    "methods/vae.py": ["tests/test_vae.py", "tests/test_vae_definitions.py"],
    "preprocess/register.py": ["tests/test_register_definitions.py"],
    "preprocess/skullstrip.py": ["tests/test_register_definitions.py"],
    "preprocess/skullstrip_template.py": ["tests/test_register_definitions.py"],
    # test_training.py trains tiny models (seconds per test, hundreds of mutants of train()):
    # its tests that train nothing; train() itself is run by test_training_definitions.py
    # with a one-weight method (milliseconds per run)
    "training/loop.py": [
        "tests/test_training.py::test_sampler_resumes_mid_epoch",
        "tests/test_training.py::test_training_run_validation",
        "tests/test_training.py::test_training_run_device_checked_like_scoring",
        "tests/test_training.py::test_volume_sampler_epoch_is_one_slice_per_volume",
        "tests/test_training.py::test_balanced_sampler_halves_and_resumes",
        "tests/test_training.py::test_steps_for_epochs_matches_the_reference",
        "tests/test_training_definitions.py",
    ],
    # the UNet replaced by a recording stand-in: the objective, scaling, t range, scoring
    "methods/ddpm.py": ["tests/test_ddpm_definitions.py"],
    "methods/ae.py": ["tests/test_ae_definitions.py"],
    "methods/base.py": ["tests/test_base_definitions.py"],
    # test_cfg_diffusion.py without its peak-memory test (two fresh interpreters, ~15 s);
    # AnoFPDM and DDIB score through the shared model, so their tests test it too
    "methods/cfg_diffusion.py": [*CFG_TESTS],
    "methods/ddib.py": [*CFG_TESTS],
    "methods/anofpdm.py": [*CFG_TESTS],
}

DOC = Path("docs/testing.md")
TABLE_START = "<!-- mutation-scores:start -->"
TABLE_END = "<!-- mutation-scores:end -->"
EQUIVALENT_HEADING = "## Equivalent survivors"
HEADER = (
    "| Module | Unit tests | Killed | Survived | No test | Timeout | Total | Score | "
    "Adjusted | Date | Commit |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


@dataclass(frozen=True)
class ModuleScore:
    """Counts of one module's mutants after a mutmut run."""

    module: str
    tests: list[str]
    killed: int
    survived: int
    no_tests: int
    timeout: int
    total: int
    equivalent: int

    @property
    def score(self) -> float:
        return (self.killed + self.timeout) / self.total if self.total else float("nan")

    @property
    def adjusted(self) -> float:
        kept = self.total - self.equivalent
        return (self.killed + self.timeout) / kept if kept else float("nan")


def slug(module: str) -> str:
    """Work-folder name of a module: ``evaluation/postprocess.py`` -> ``evaluation.postprocess``."""
    return module.removesuffix(".py").replace("/", ".")


def toml_value(value: object) -> str:
    """TOML for the flat values a ``[tool.mutmut]`` table holds (JSON's syntax is TOML's here)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | list):
        return json.dumps(value)
    raise TypeError(f"[tool.mutmut]: unsupported value {value!r}")


def toml_table(name: str, table: dict) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())


def work_pyproject(root: Path, module: str, tests: list[str]) -> str:
    """The work folder's pyproject: pytest's settings and [tool.mutmut] narrowed to a module."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    tool = data.get("tool", {})
    mutmut = dict(tool.get("mutmut", {}))
    mutmut["source_paths"] = ["src"]
    mutmut["only_mutate"] = [f"src/brainuad/{module}"]
    mutmut["pytest_add_cli_args_test_selection"] = tests
    mutmut.setdefault("also_copy", ["tests", "config"])
    return (
        toml_table("tool.pytest.ini_options", tool.get("pytest", {}).get("ini_options", {}))
        + "\n"
        + toml_table("tool.mutmut", mutmut)
    )


def equivalent_names(doc: Path) -> set[str]:
    """Mutant names listed (in backticks) under the doc's equivalent-survivors heading."""
    if not doc.exists():
        return set()
    text = doc.read_text()
    if EQUIVALENT_HEADING not in text:
        return set()
    section = text.split(EQUIVALENT_HEADING, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(brainuad\.[^`\s]+__mutmut_\d+)`", section))


def single_threaded_env() -> dict[str, str]:
    """The environment of a mutmut run: one thread per numerical library. mutmut forks every
    mutant's run from one warm process; a torch (OpenMP) thread pool started before the fork
    leaves the child waiting for threads that do not exist, which reads as a timeout."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = "1"
    # numba's OpenMP layer shares (and resizes) torch's libgomp pool, and its default layer
    # could end a forked child by SIGTERM; on the workqueue layer neither happened in the
    # simplex-noise methods' runs (NUMBA_DISABLE_JIT avoids both too, but makes their tests
    # too slow for hundreds of mutants)
    env["NUMBA_THREADING_LAYER"] = "workqueue"
    return env


def run_module(
    root: Path,
    module: str,
    max_children: int,
    equivalents: set[str],
    mutmut: str,
    reuse: bool = False,
    rerun_survivors: bool = False,
) -> ModuleScore:
    """Run mutmut on one module in its own work folder (``reuse``: read the results of the
    last run there instead, e.g. after listing equivalent survivors; ``rerun_survivors``: run
    only the last run's survivors again there, e.g. after adding tests, which cannot revive
    a killed mutant); return its counts."""
    if module not in UNIT_TESTS:
        raise SystemExit(f"{module}: no unit tests listed in brainuad.bench.mutation.UNIT_TESTS")
    if not (root / "src/brainuad" / module).is_file():
        raise SystemExit(f"src/brainuad/{module}: no such module")
    tests = [t for t in UNIT_TESTS[module] if (root / t.partition("::")[0]).is_file()]
    work = root / ".mutation" / slug(module)
    if (reuse or rerun_survivors) and not (work / "mutants").is_dir():
        raise SystemExit(f"{work}: no results of an earlier run to reuse")
    if rerun_survivors:
        names = (work / "survivors.txt").read_text().split()
        # mutmut maps tests to the functions they call once: map the changed tests afresh
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        if names:
            subprocess.run(
                [mutmut, "run", "--max-children", str(max_children), *names],
                cwd=work,
                check=True,
                env=single_threaded_env(),
            )
    elif not reuse:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        for name in ("src", "tests", "config"):
            (work / name).symlink_to(root / name)
        (work / "pyproject.toml").write_text(work_pyproject(root, module, tests))
        subprocess.run(
            [mutmut, "run", "--max-children", str(max_children)],
            cwd=work,
            check=True,
            env=single_threaded_env(),
        )
    status = mutant_status(work, module)
    counts = Counter(status.values())
    survivors = sorted(name for name, st in status.items() if st in ("survived", "no tests"))
    (work / "survivors.txt").write_text("".join(f"{s}\n" for s in survivors))
    return ModuleScore(
        module=module,
        tests=tests,
        killed=counts["killed"],
        survived=counts["survived"],
        no_tests=counts["no tests"],
        timeout=counts["timeout"],
        total=len(status),
        equivalent=len(equivalents.intersection(survivors)),
    )


def mutant_status(work: Path, module: str) -> dict[str, str]:
    """Mutant name -> mutmut's status (killed, survived, no tests, timeout, ...), read from
    the ``.meta`` file mutmut keeps next to the mutated module."""
    from mutmut.stats import status_by_exit_code

    meta = work / "mutants/src/brainuad" / f"{module}.meta"
    if not meta.is_file():
        raise SystemExit(f"{meta}: no mutmut results")
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in exit_codes.items()}


def table_row(score: ModuleScore, date: str, commit: str) -> str:
    tests = ", ".join(
        f"`{Path(t).name}`" for t in dict.fromkeys(t.partition("::")[0] for t in score.tests)
    )
    return (
        f"| `{score.module}` | {tests} | {score.killed} | {score.survived} | {score.no_tests} | "
        f"{score.timeout} | {score.total} | {score.score:.0%} | {score.adjusted:.0%} | "
        f"{date} | {commit} |"
    )


def update_doc(doc: Path, rows: dict[str, str], command: str) -> None:
    """Replace the rows of the modules just run in the scores table; keep the others."""
    text = doc.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{doc}: no {TABLE_START} ... {TABLE_END} block for the scores")
    before, rest = text.split(TABLE_START, 1)
    block, after = rest.split(TABLE_END, 1)
    kept = {
        m.group(1): line for line in block.splitlines() if (m := re.match(r"\| `([^`]+)` \|", line))
    }
    kept.update(rows)
    last = f"Last run: `{command}`"
    body = "\n".join(kept[m] for m in sorted(kept))
    doc.write_text(f"{before}{TABLE_START}\n{last}\n\n{HEADER}\n{body}\n{TABLE_END}{after}")


def git_commit(root: Path) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "src", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "modules", nargs="+", help="paths under src/brainuad/, e.g. slices/splits.py"
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-doc", action="store_true", help="print, but leave docs/testing.md")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="rescore the last run's results in .mutation/ (e.g. after listing equivalents)",
    )
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="run only the last run's survivors again, in the same work folder (after adding "
        "tests), and rescore",
    )
    args = parser.parse_args(argv)
    root = Path.cwd()
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    equivalents = equivalent_names(root / DOC)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    commit = git_commit(root)
    command = "make mutation MODULES=" + shlex.quote(" ".join(args.modules))
    for module in args.modules:
        score = run_module(
            root,
            module,
            args.max_children,
            equivalents,
            mutmut,
            reuse=args.reuse,
            rerun_survivors=args.rerun_survivors,
        )
        row = table_row(score, date, commit)
        print(row, flush=True)
        if not args.no_doc:  # after each module, so a long run's finished modules are kept
            update_doc(root / DOC, {module: row}, command)


if __name__ == "__main__":
    main()
