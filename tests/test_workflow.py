"""The real workflow on the tiny config: dry runs, one real end-to-end run, and targets.

The end-to-end run builds everything from nothing (synthetic generation, ANTs, deepbet,
training, scoring, calibration, metrics, tables, figures) in a temporary working
directory, once per session; the tests after it inspect what it made and what a second
invocation would do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from brainuad.evaluation.significance import CI_COLUMNS, SIGNIFICANCE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config" / "tiny.yaml"
# The trained methods of the tiny study (the training-free `intensity` has no training job).
TRAINED_IN_TINY = ("ae", "ddpm", "ddpm_simplex", "dae", "vae")
# The seed methods (tests/config/seed_methods.yaml, planned by the dry-run test): those
# trained on slice labels of a lesion cohort's train split, and their earlier stages.
SEED_METHODS = ROOT / "tests" / "config" / "seed_methods.yaml"
TRAINED_SEED_METHODS = (
    "autoddpm", "wolleb", "cddpm", "cddpm_nossl", "anofpdm", "ddib", "pddpm", "anoddpm",
)  # fmt: skip
WEAK_SEED_METHODS = {"wolleb": "synth_brats", "anofpdm": "synth_brats", "ddib": "synth_brats"}
EARLIER_SEED_STAGES = {"wolleb": "classifier", "cddpm": "spark"}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(TINY),
        *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table ({} for nothing to do)."""
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.splitlines()]
    if "Job stats:" not in lines:
        assert "Nothing to be done" in output, f"no job table in dry run:\n{output}"
        return {}
    counts: dict[str, int] = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts


def test_default_config_dry_run_spans_generation_to_slices(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "snakemake", *args, "--snakefile", str(ROOT / "Snakefile"),
             "--directory", str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip

    # The subject sheets are a checkpoint: a dry run plans past them once they exist.
    assert set(planned_jobs(run("-n"))) >= {"subject_sheet"}
    run("subjects", "--cores", "2")
    jobs = planned_jobs(run("-n"))
    for rule in ("generate_synthetic_subject", "preprocess_subject", "extract_slices",
                 "make_splits", "train_model", "score_dataset", "subject_metrics"):  # fmt: skip
        assert jobs.get(rule, 0) > 0, (rule, jobs)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny_study")
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.mark.slow
def test_tiny_study_builds_data_contracts(tiny_study: Path) -> None:
    config = json.loads(json.dumps(__import__("yaml").safe_load(TINY.read_text())))
    size = config["slices"]["size"]
    for dataset in config["datasets"]:
        with h5py.File(tiny_study / "results" / "slices" / f"{dataset}.h5") as f:
            assert f["images"].shape[1:] == (len(config["slices"]["sequences"]), size, size)
            assert f["images"].chunks == (1, *f["images"].shape[1:])
            assert f["images"].compression == "lzf"
        splits = pd.read_csv(tiny_study / "results" / "splits" / f"{dataset}.csv")
        assert set(splits.columns) == {"subject", "split", "fold"}
        assert not splits.groupby(["fold", "subject"]).size().gt(1).any()
    qc = pd.read_csv(tiny_study / "results" / "qc" / "synth_ixi.csv")
    assert (qc["brainmask_dice_vs_truth"] > 0.9).all(), qc
    assert (qc["registered_brainmask_dice_vs_template"] > 0.9).all(), qc


@pytest.mark.slow
def test_tiny_study_calibrates_on_validation_only(tiny_study: Path) -> None:
    record = json.loads(
        (tiny_study / "results" / "calibration" / "ae" / "fold0" / "threshold.json").read_text()
    )
    for protocol in record["thresholds"].values():
        assert protocol["chosen_on"]["split"] == "val"
        assert protocol["chosen_on"]["uses_test_data"] is False


@pytest.mark.slow
def test_tiny_study_tables_and_figures(tiny_study: Path) -> None:
    main = (tiny_study / "results" / "tables" / "main.md").read_text()
    assert "ae" in main and "ddpm" in main
    # both threshold protocols, each column naming its own, and the evaluation mode
    header = next(line for line in main.splitlines() if line.startswith("| Method"))
    assert "5 % healthy FPR, label-free" in header and "best val. Dice, pixel labels" in header
    assert "Evaluation: eroded brain mask" in main
    for name in ("dice_boxplot", "pr_curves", "qualitative", "training_curves", "significance"):
        assert (tiny_study / "results" / "figures" / f"{name}.png").stat().st_size > 0
    # Significance between methods: one row per pair of methods and metric on the lesion
    # cohort (its single test subject is too few: untested, with the reason).
    tests = pd.read_csv(tiny_study / "results" / "tables" / "significance.csv")
    assert list(tests.columns) == SIGNIFICANCE_COLUMNS
    n_methods = len(__import__("yaml").safe_load(TINY.read_text())["methods"])
    assert len(tests) == 2 * n_methods * (n_methods - 1) // 2, tests
    assert set(tests["dataset"]) == {"synth_brats"} and tests["p_value"].isna().all()
    intervals = pd.read_csv(tiny_study / "results" / "tables" / "confidence_intervals.csv")
    assert list(intervals.columns) == CI_COLUMNS and len(intervals) == 2 * n_methods
    for stem in ("significance", "confidence_intervals"):
        assert r"\begin{table}" in (tiny_study / "results" / "tables" / f"{stem}.tex").read_text()


@pytest.mark.slow
def test_report_holds_the_tables_and_figures(tiny_study: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.zip"
    snakemake(tiny_study, "--report", str(report))
    with zipfile.ZipFile(report) as archive:
        names = {Path(name).name for name in archive.namelist()}
    for table in ("main.md", "significance.md", "confidence_intervals.md"):
        assert table in names, sorted(names)
    for figure in ("dice_boxplot", "pr_curves", "qualitative", "significance"):
        assert f"{figure}.png" in names, sorted(names)


@pytest.mark.slow
def test_second_run_does_nothing(tiny_study: Path) -> None:
    result = snakemake(tiny_study, "-n")
    assert planned_jobs(result) == {}, result.stdout


FOLD1_AE = ("models", "scores", "calibration", "metrics")


@pytest.mark.slow
def test_deleted_fold_retrains_only_that_fold(tiny_study: Path) -> None:
    """Delete one fold's model and what was made from it; a dry run for that fold's metrics
    plans train_model and its downstream jobs for that fold alone (no other fold or method).
    Only planning is checked: the planned job would resume from the surviving checkpoint."""
    results = tiny_study / "results"
    backup = tiny_study / "fold_backup"
    for stage in FOLD1_AE:
        shutil.copytree(results / stage / "ae" / "fold1", backup / stage)
    try:
        for stage in FOLD1_AE:
            shutil.rmtree(results / stage / "ae" / "fold1")
        result = snakemake(tiny_study, "-n", "results/metrics/ae/fold1/synth_brats.csv")
        jobs = planned_jobs(result)
        assert jobs.get("train_model") == 1, jobs
        assert set(jobs) == {"train_model", "score_dataset", "calibrate_threshold",
                             "subject_metrics"}, jobs  # fmt: skip
        assert "results/models/ae/fold1/model.pt" in result.stdout
        assert "fold0" not in result.stdout and "ddpm" not in result.stdout
    finally:
        for stage in FOLD1_AE:
            if (results / stage / "ae" / "fold1").exists():
                shutil.rmtree(results / stage / "ae" / "fold1")
            # copytree keeps modification times, so the restored outputs stay up to date
            shutil.copytree(backup / stage, results / stage / "ae" / "fold1")
        shutil.rmtree(backup)
    assert planned_jobs(snakemake(tiny_study, "-n")) == {}


@pytest.mark.slow
def test_forcerun_retrains_one_fold_with_outputs_in_place(tiny_study: Path) -> None:
    """With every output in place, a dry run with --forcerun train_model for one fold's
    metrics plans one train_model job, that fold's (no other fold or method). Only
    planning is checked: the planned job would resume from the surviving checkpoint."""
    result = snakemake(
        tiny_study, "-n", "--forcerun", "train_model", "--",
        "results/metrics/ddpm/fold0/synth_brats.csv",
    )  # fmt: skip
    jobs = planned_jobs(result)
    assert jobs.get("train_model") == 1, jobs
    assert "fold1" not in result.stdout and "results/models/ae" not in result.stdout


@pytest.mark.slow
def test_figures_target_rebuilds_without_training_or_scoring(tiny_study: Path) -> None:
    shutil.rmtree(tiny_study / "results" / "figures")
    jobs = planned_jobs(snakemake(tiny_study, "-n", "figures"))
    assert jobs == {"plot_figures": 1, "plot_significance": 1, "figures": 1}, jobs
    snakemake(tiny_study, "--cores", "1", "figures")
    assert (tiny_study / "results" / "figures" / "qualitative.png").exists()


@pytest.mark.slow
def test_killed_training_job_resumes_from_checkpoint(tiny_study: Path) -> None:
    """SIGKILL the running training job (as a pre-emption or time limit would), let
    Snakemake fail it, re-run the same target: the step counter continues from the last
    checkpoint."""
    import signal
    import time

    import psutil

    target = "results/models/ae/fold0/model.pt"
    checkpoint_dir = tiny_study / "results" / "checkpoints" / "ae" / "fold0"
    shutil.rmtree(checkpoint_dir)

    def run_command(max_steps: int) -> list[str]:
        override = tiny_study / f"resume_{max_steps}.yaml"
        override.write_text(
            f"methods: {{ae: {{training: {{max_steps: {max_steps}, checkpoint_every: 25}}}}}}\n"
        )
        return [
            sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(tiny_study), "--configfile", str(TINY), str(override),
            "--cores", "1", "--rerun-incomplete", "--forcerun", "train_model", "--", target,
        ]  # fmt: skip

    command = run_command(100000)
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = checkpoint_dir / "train_log.csv"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) > 60:
                break
            assert job.poll() is None, "training finished or failed before it could be killed"
            time.sleep(0.5)
        else:
            raise AssertionError("training did not reach step 60 in time")
        trainers = [
            child
            for child in psutil.Process(job.pid).children(recursive=True)
            if any("train_model" in part for part in child.cmdline())
        ]
        assert trainers, "no training process found"
        for trainer in trainers:
            trainer.send_signal(signal.SIGKILL)
        assert job.wait(timeout=120) != 0, "Snakemake should report the killed job as failed"
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    killed_at = len(log.read_text().splitlines()) - 1
    assert killed_at >= 60
    # A step's log row is written before its checkpoint, so a kill that lands while the
    # checkpoint is being written leaves the previous checkpoint on disk: resume must start
    # from whatever checkpoint survived, never from a half-written one.
    checkpoint = torch.load(checkpoint_dir / "last.pt", map_location="cpu", weights_only=True)
    saved_step = int(checkpoint["step"])
    assert saved_step % 25 == 0 and killed_at - 25 <= saved_step <= killed_at

    resumed_to = 80 if killed_at < 75 else killed_at + 20
    result = subprocess.run(run_command(resumed_to), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    steps = pd.read_csv(log)["step"].tolist()
    assert steps == list(range(1, resumed_to + 1)), "steps repeated or skipped on resume"
    summary = json.loads((tiny_study / "results" / "models" / "ae" / "fold0" / "config.json")
                         .read_text())["summary"]  # fmt: skip
    assert summary["resumed"] is True
    assert summary["start_step"] == saved_step
    assert not list(checkpoint_dir.glob(".last.pt.*")), "temporary of the killed write left"
    assert summary["final_step"] == resumed_to


TOY_METHODS = ROOT / "tests" / "config" / "toy_methods.yaml"


def toy_snakemake(
    workdir: Path, overlay: Path | tuple[Path, ...], *args: str
) -> subprocess.CompletedProcess:
    """Snakemake on tiny.yaml + ``overlay`` (one file or several, merged in order), with
    tests/ on PYTHONPATH for toy_methods."""
    overlays = (overlay,) if isinstance(overlay, Path) else overlay
    path = [str(ROOT / "tests"), os.getenv("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, path))}
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(TINY), *map(str, overlays), *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def planned_job_inputs(result: subprocess.CompletedProcess, rule: str) -> dict[str, list[str]]:
    """For each planned job of ``rule``: its wildcards line -> its input files."""
    jobs, lines = {}, result.stdout.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != f"rule {rule}:":
            continue
        block = lines[index + 1 : index + 15]
        inputs = next(b for b in block if b.strip().startswith("input:"))
        wildcards = next(b for b in block if b.strip().startswith("wildcards:"))
        jobs[wildcards.split(":", 1)[1].strip()] = [
            path.strip() for path in inputs.split(":", 1)[1].split(",")
        ]
    return jobs


def test_training_inputs_follow_each_stages_supervision(tmp_path: Path) -> None:
    """A study's own methods plug in (method_modules); the two-stage method plans two training
    jobs per fold, the later one reading the earlier one's file; the weakly supervised one
    reads its lesion cohort (train split) only, and no healthy-only method reads a lesion
    cohort; every method is scored on the same test subjects' splits files."""
    result = toy_snakemake(tmp_path, (SEED_METHODS, TOY_METHODS), "-n")
    jobs = planned_jobs(result)
    # toy_two_stage's pretraining and the earlier stages of the seed methods, 2 folds each.
    earlier = {"toy_two_stage": "pretrain", **EARLIER_SEED_STAGES}
    assert jobs["train_stage"] == 2 * len(earlier), jobs
    trained = planned_job_inputs(result, "train_model")
    stages = planned_job_inputs(result, "train_stage")
    assert set(stages) == {
        f"method={method}, fold={k}, stage={stage}"
        for method, stage in earlier.items()
        for k in (0, 1)
    }
    weak = {"toy_weak": "synth_brats", **WEAK_SEED_METHODS}
    lesion_data = ["results/slices/synth_brats.h5", "results/splits/synth_brats.csv"]
    for wildcards, inputs in stages.items():
        if wildcards.split(",")[0].removeprefix("method=") in weak:
            assert inputs == lesion_data, (wildcards, inputs)
    for wildcards, inputs in trained.items():
        fold = wildcards.split("fold=")[1].split(",")[0]
        method = wildcards.split(",")[0].removeprefix("method=")
        if method in weak:
            assert [p for p in inputs if not p.endswith(".pt")] == lesion_data, inputs
        else:
            assert not any("synth_brats" in path for path in inputs), (wildcards, inputs)
        stage_files = [path for path in inputs if path.endswith(".pt")]
        if method in earlier:
            assert stage_files == [f"results/models/{method}/fold{fold}/{earlier[method]}.pt"]
        else:
            assert not stage_files, (wildcards, inputs)
    assert {w.split(",")[0] for w in trained} == {
        "method=ae", "method=ddpm", "method=toy_two_stage", "method=toy_weak",
        *(f"method={m}" for m in (*TRAINED_IN_TINY, *TRAINED_SEED_METHODS)),
    }  # fmt: skip
    # The training-free baseline is scored without a model file.
    scored = planned_job_inputs(result, "score_dataset")
    intensity = [inputs for w, inputs in scored.items() if w.startswith("method=intensity")]
    assert intensity and all(not any(".pt" in p for p in i) for i in intensity)


@pytest.mark.slow
def test_two_stage_method_trains_in_order_and_retrains_from_a_deleted_stage(
    tiny_study: Path,
) -> None:
    """In the built tiny study: the two-stage toy method trains its pretraining, then the
    model from it; a deleted pretraining file of one fold is retrained with what consumes it,
    that fold's two training jobs only."""
    overlay = tiny_study / "two_stage.yaml"
    overlay.write_text(
        "method_modules: [toy_methods]\n"
        "methods:\n  toy_two_stage:\n    training: {max_steps: 3, batch_size: 4,"
        " checkpoint_every: 3, validate_every: 3}\n"
    )
    models = tiny_study / "results" / "models" / "toy_two_stage"
    targets = [f"results/models/toy_two_stage/fold{k}/model.pt" for k in (0, 1)]
    result = toy_snakemake(tiny_study, overlay, "--cores", "2", *targets)
    assert "train_stage" in result.stdout + result.stderr
    for k in (0, 1):
        record = json.loads((models / f"fold{k}" / "config.json").read_text())
        assert record["stage"] == "model"
        assert record["consumed"] == {
            "pretrain": f"results/models/toy_two_stage/fold{k}/pretrain.pt"
        }
        assert (models / f"fold{k}" / "pretrain_train_log.csv").exists()
    # Snakemake leaves an existing output alone when only an intermediate input is missing,
    # so the deleted stage file is asked for by name (docs/cluster.md): it is retrained, and
    # so is what consumes it, for that fold only.
    (models / "fold1" / "pretrain.pt").unlink()
    deleted = "results/models/toy_two_stage/fold1/pretrain.pt"
    result = toy_snakemake(tiny_study, overlay, "-n", deleted, *targets)
    assert planned_jobs(result) == {"train_stage": 1, "train_model": 1}, result.stdout
    assert "fold0" not in "".join(planned_job_inputs(result, "train_model"))


@pytest.mark.slow
def test_seed_methods_run_end_to_end_on_the_tiny_study(tiny_study: Path, tmp_path: Path) -> None:
    """Every seed method at test size (tests/config/seed_methods.yaml) through the real
    workflow, fold 0, on a copy of the built tiny study's data: earlier stages, training,
    scoring, AnoFPDM's label-free selection, calibration on validation only, per-subject
    metrics on the lesion cohort's test subjects."""
    workdir = tmp_path / "seed_methods"
    shutil.copytree(
        tiny_study,
        workdir,
        symlinks=True,
        ignore=shutil.ignore_patterns("models", "scores", "calibration", "metrics", "tables"),
    )
    targets = [f"results/metrics/{m}/fold0/synth_brats.csv" for m in TRAINED_SEED_METHODS]
    targets.append("results/calibration/anofpdm/fold0/selection.json")  # no metric reads it
    toy_snakemake(workdir, SEED_METHODS, "--cores", "2", *targets)

    results = workdir / "results"
    test_subjects = pd.read_csv(results / "splits" / "synth_brats.csv").query(
        "fold == 0 and split == 'test'"
    )["subject"]
    for method in TRAINED_SEED_METHODS:
        table = pd.read_csv(results / "metrics" / method / "fold0" / "synth_brats.csv")
        assert sorted(table["subject"]) == sorted(test_subjects), method
        record = json.loads(
            (results / "calibration" / method / "fold0" / "threshold.json").read_text()
        )
        for protocol in record["thresholds"].values():
            assert protocol["chosen_on"]["split"] == "val", (method, protocol)
    for method, stage in EARLIER_SEED_STAGES.items():
        config = json.loads((results / "models" / method / "fold0" / "config.json").read_text())
        assert config["consumed"] == {stage: f"results/models/{method}/fold0/{stage}.pt"}
    selection = json.loads(
        (results / "calibration" / "anofpdm" / "fold0" / "selection.json").read_text()
    )
    chosen_on = selection["chosen_on"]
    assert (chosen_on["split"], chosen_on["uses_pixel_labels"]) == ("val", False)
