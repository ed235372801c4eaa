"""The workflow runs through a real Slurm with the cluster profile of slurm/.

Needs a running Slurm on this machine: `bash tests/cluster/slurm_up.sh` starts a single
node (partitions `cpu` and `gpu`, one fake GPU, slurmdbd accounting). Skipped, with the
reason, when there is none. Every run goes through `snakemake --profile slurm --profile
tests/cluster/profile`: the second profile changes only test timings (see its comments),
so the partitions, GPU requests and runtimes checked here are those of slurm/.

Proof that the jobs ran through Slurm comes from Slurm itself: `sacct` (or `scontrol show
job` when there is no accounting) lists one job per rule instance, with the rule name in
its comment (the executor plugin writes `rule_<name>[_wildcards_<values>]`), in the
partition the profile chose, with the GPU it asked for.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from workflow_rules import network_rules

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
TOY = Path(__file__).resolve().parent / "toy"
# What the copy of the checkout leaves out: outputs and caches of earlier runs.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "results", ".snakemake", "logs", "benchmarks", ".venv", "__pycache__",
    ".pytest_cache", ".ruff_cache", "*.egg-info", "build", "dist",
)  # fmt: skip
# The real study's target: the data stage and one model of one fold of config/tiny.yaml.
TINY_TARGET = "results/models/ae/fold0/model.pt"
GPU_RULES = network_rules()


def run(cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@dataclass(frozen=True)
class LocalSlurm:
    """What the test needs to know about the Slurm it submits to."""

    cpu_partition: str
    gpu_partition: str
    gpu_model: str
    account: str | None
    has_sacct: bool

    def environment(self) -> dict[str, str]:
        """The site variables that slurm/config.v8+.yaml reads."""
        env = {
            "BRAINUAD_SLURM_PARTITION": self.cpu_partition,
            "BRAINUAD_SLURM_GPU_PARTITION": self.gpu_partition,
            "BRAINUAD_SLURM_GPU_MODEL": self.gpu_model,
        }
        if self.account:
            env["BRAINUAD_SLURM_ACCOUNT"] = self.account
        return env


def unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it where CI started a Slurm and requires it."""
    if os.environ.get("BRAINUAD_REQUIRE_SLURM") == "1":
        pytest.fail(f"BRAINUAD_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def discover_slurm() -> LocalSlurm:
    """Skips the test, with the reason, unless a usable Slurm is running."""
    if shutil.which("sinfo") is None:
        unavailable("no Slurm: `sinfo` not found; start one with tests/cluster/slurm_up.sh")
    try:
        info = run(["sinfo", "-h", "-o", "%P|%t|%G"], timeout=15)
    except subprocess.TimeoutExpired:
        unavailable("no Slurm: `sinfo` timed out; is slurmctld running?")
    if info.returncode != 0:
        last_line = (info.stderr.strip().splitlines() or ["no message"])[-1]
        unavailable(f"no Slurm: `sinfo` failed ({last_line}); see tests/cluster/slurm_up.sh")
    rows = [line.split("|") for line in info.stdout.split() if line.count("|") == 2]
    if not any(state in {"idle", "mix"} for _, state, _ in rows):
        unavailable(f"no idle Slurm node: sinfo says {info.stdout.strip()!r}")

    partitions = [name.rstrip("*") for name, _, _ in rows]
    default = next((name.rstrip("*") for name, _, _ in rows if name.endswith("*")), None)
    gpu_rows = [(name.rstrip("*"), gres) for name, _, gres in rows if "gpu" in gres]
    if not gpu_rows:
        unavailable(
            "the local Slurm has no GPU gres, so the profile's GPU jobs cannot be scheduled; "
            "tests/cluster/slurm_up.sh configures a fake one"
        )
    gpu_partition = "gpu" if "gpu" in partitions else gpu_rows[0][0]
    gres = dict(gpu_rows)[gpu_partition] if gpu_partition in dict(gpu_rows) else gpu_rows[0][1]
    # gres such as `gpu:fake:1` or `gpu:a100:4(S:0-1)`; `gpu:2` has no model.
    model = re.match(r"gpu:([A-Za-z_][\w.]*):\d", gres)

    has_sacct = shutil.which("sacct") is not None and run(["sacct", "-n", "-X"]).returncode == 0
    account = None
    if has_sacct and shutil.which("sacctmgr"):
        user = run(["id", "-un"]).stdout.strip()
        listed = run(["sacctmgr", "-n", "-P", "list", "user", user, "format=defaultaccount"])
        account = (listed.stdout.strip() or None) if listed.returncode == 0 else None
    return LocalSlurm(
        cpu_partition=default or partitions[0],
        gpu_partition=gpu_partition,
        gpu_model=model.group(1) if model else "",
        account=account,
        has_sacct=has_sacct,
    )


@pytest.fixture(scope="module")
def slurm() -> LocalSlurm:
    return discover_slurm()


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    rule: str
    partition: str
    account: str
    state: str
    tres: str


def slurm_jobs(workdir: Path, since: str, has_sacct: bool) -> list[SlurmJob]:
    """Slurm's own record of the jobs that ran in ``workdir`` since ``since``."""
    jobs = []
    if has_sacct:
        fields = "JobID,Comment,Partition,Account,State,AllocTRES,WorkDir"
        # Job records reach slurmdbd a moment after the job ends.
        for _ in range(20):
            out = run(["sacct", "-X", "-P", "-n", "-S", since, "-o", fields]).stdout
            rows = [line.split("|") for line in out.splitlines() if line.count("|") == 6]
            rows = [r for r in rows if Path(r[6]).resolve() == workdir.resolve()]
            if rows and all(r[4] not in {"PENDING", "RUNNING"} for r in rows):
                break
            time.sleep(1)
        for job_id, comment, partition, account, state, tres, _ in rows:
            jobs.append(SlurmJob(job_id, comment, partition, account, state, tres))
    else:
        # slurmctld keeps finished jobs for MinJobAge (300 s unless configured otherwise).
        out = run(["scontrol", "show", "job", "-o"]).stdout
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if Path(fields.get("WorkDir", "/nonexistent")).resolve() != workdir.resolve():
                continue
            jobs.append(
                SlurmJob(
                    fields["JobId"],
                    fields.get("Comment", ""),
                    fields.get("Partition", ""),
                    fields.get("Account", ""),
                    fields.get("JobState", ""),
                    fields.get("AllocTRES", "") + "," + fields.get("TresPerJob", ""),
                )
            )
    return jobs


def rule_of(comment: str) -> str:
    """`rule_train_model_wildcards_ae_0` -> `train_model`."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def submitted_rules(log: str) -> Counter[str]:
    """Rule instances Snakemake submitted to Slurm (its `localrule` lines ran on the host;
    checkpoint rules, such as the subject sheets, are printed as `checkpoint <name>:`)."""
    return Counter(re.findall(r"^(?:rule|checkpoint) (\w+):$", log, flags=re.MULTILINE))


def run_through_slurm(
    workdir: Path, slurm: LocalSlurm, args: list[str], timeout: float
) -> tuple[str, str]:
    """Runs `snakemake --profile slurm --profile tests/cluster/profile ARGS` in ``workdir``.

    Returns the combined output and the sacct start time of the run.
    """
    env = {
        **os.environ,
        **slurm.environment(),
        # Jobs run snakemake again inside the allocation (sbatch --export=ALL): they must
        # find this interpreter and this copy's package, not the checkout's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(workdir / "src"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", str(ROOT / "slurm"),
        "--profile", str(ROOT / "tests" / "cluster" / "profile"),
        # Without accounting `sacct` fails and the plugin would poll it forever.
        *([] if slurm.has_sacct else ["--slurm-status-command", "squeue"]),
        *args,
    ]  # fmt: skip
    started = time.monotonic()
    try:
        proc = run(cmd, timeout=timeout, cwd=workdir, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"snakemake through Slurm ran past {timeout} s:\n{err.stdout}\n{err.stderr}")
    output = proc.stdout + proc.stderr
    print(f"snakemake through Slurm: {time.monotonic() - started:.0f} s")
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {path}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
        )
        pytest.fail(f"snakemake exited {proc.returncode}:\n{output[-8000:]}\n{logs}")
    return output, since


def check_slurm_record(workdir: Path, slurm: LocalSlurm, output: str, since: str) -> None:
    """Every submitted rule instance is a completed Slurm job, placed as the profile says."""
    expected = submitted_rules(output)
    assert expected, f"snakemake submitted no job to Slurm:\n{output[-4000:]}"
    jobs = slurm_jobs(workdir, since, slurm.has_sacct)
    ran = Counter(rule_of(job.rule) for job in jobs)
    assert ran == expected, (
        f"Slurm ran {dict(ran)}, Snakemake submitted {dict(expected)}; Slurm jobs: {jobs}"
    )
    for job in jobs:
        rule = rule_of(job.rule)
        assert job.state == "COMPLETED", f"Slurm job {job.job_id} ({rule}) is {job.state}"
        if rule in GPU_RULES:
            assert job.partition == slurm.gpu_partition, job
            assert "gpu" in job.tres, f"{rule} got no GPU from Slurm: {job}"
        else:
            assert job.partition == slurm.cpu_partition, job
        if slurm.account:
            assert job.account == slurm.account, job
    # The plugin's per-job Slurm logs sit where docs/cluster.md says.
    for rule in expected:
        assert list((workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log")), rule


def test_toy_workflow_runs_through_slurm(slurm: LocalSlurm, tmp_path: Path) -> None:
    """A toy with the real GPU rule names: the profile's mapping, independent of the study."""
    workdir = tmp_path / "toy"
    shutil.copytree(TOY, workdir)
    output, since = run_through_slurm(workdir, slurm, [], timeout=600)

    for fold in (0, 1):
        assert (workdir / f"results/scores/toy/fold{fold}/toy_test.txt").read_text() == "scored\n"
        log = (workdir / f"logs/train_model/toy/fold{fold}.log").read_text()
        # Slurm handed the job its (fake) GPU.
        assert "CUDA_VISIBLE_DEVICES=0" in log, log
    check_slurm_record(workdir, slurm, output, since)


def test_tiny_study_target_runs_through_slurm(slurm: LocalSlurm, tmp_path: Path) -> None:
    """The real workflow on config/tiny.yaml: data stage and one model, every job in Slurm."""
    if not (ROOT / "Snakefile").exists() or not (ROOT / "config" / "tiny.yaml").exists():
        pytest.skip("the workflow (Snakefile, config/tiny.yaml) is not in this checkout yet")
    workdir = tmp_path / "repo"
    shutil.copytree(ROOT, workdir, ignore=COPY_IGNORE)
    # The target goes before --configfile, which would take it for a second config file.
    output, since = run_through_slurm(
        workdir, slurm, [TINY_TARGET, "--configfile", "config/tiny.yaml"], timeout=1200
    )

    assert (workdir / TINY_TARGET).stat().st_size > 0
    assert (workdir / "results/slices/synth_ixi.h5").exists()
    assert (workdir / "results/splits/synth_ixi.csv").exists()
    check_slurm_record(workdir, slurm, output, since)
