"""Summarise the per-job ``benchmarks/`` files of a run into per-rule and per-method tables.

``python -m brainuad.timings benchmarks`` prints, per rule, the number of jobs and their
wall-clock and CPU seconds (total, mean, max), as Markdown, for docs/benchmarks.md;
``python -m brainuad.timings benchmarks --by-method`` prints, per method, the seconds of its
training, scoring and evaluation jobs (the rules whose benchmark paths start with the
method: ``benchmarks/<rule>/<method>/…``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def rule_timings(benchmark_dir: str | Path) -> pd.DataFrame:
    """One row per rule: jobs, wall seconds (total, mean, max), CPU seconds, max RSS in MB."""
    rows = []
    for path in sorted(Path(benchmark_dir).rglob("*.tsv")):
        rule = path.relative_to(benchmark_dir).parts[0].removesuffix(".tsv")
        record = pd.read_csv(path, sep="\t").iloc[-1]
        rows.append(
            {
                "rule": rule,
                "s": float(record["s"]),
                "cpu_time": float(record.get("cpu_time", float("nan"))),
                "max_rss": float(record.get("max_rss", float("nan"))),
            }
        )
    if not rows:
        raise FileNotFoundError(f"{benchmark_dir}: no benchmark files (*.tsv)")
    frame = pd.DataFrame(rows)
    summary = frame.groupby("rule", sort=False).agg(
        jobs=("s", "size"),
        wall_total_s=("s", "sum"),
        wall_mean_s=("s", "mean"),
        wall_max_s=("s", "max"),
        cpu_total_s=("cpu_time", "sum"),
        max_rss_mb=("max_rss", "max"),
    )
    return summary.round(1).reset_index()


#: Rules of one method (their benchmark files are ``<rule>/<method>/…``), by phase.
METHOD_PHASES = {
    "train_stage": "training",
    "train_model": "training",
    "score_dataset": "scoring",
    "select_anofpdm_constants": "scoring",
    "calibrate_threshold": "evaluation",
    "subject_metrics": "evaluation",
}


def method_timings(benchmark_dir: str | Path) -> pd.DataFrame:
    """One row per method: CPU seconds of its training, scoring and evaluation jobs
    (:data:`METHOD_PHASES`), their sum, and the wall seconds of its jobs summed."""
    rows = []
    for rule, phase in METHOD_PHASES.items():
        for path in sorted((Path(benchmark_dir) / rule).glob("*/**/*.tsv")):
            record = pd.read_csv(path, sep="\t").iloc[-1]
            method = path.relative_to(Path(benchmark_dir) / rule).parts[0]
            rows.append(
                {
                    "method": method,
                    "phase": phase,
                    "cpu": float(record.get("cpu_time", float("nan"))),
                    "wall": float(record["s"]),
                }
            )
    if not rows:
        raise FileNotFoundError(f"{benchmark_dir}: no benchmark files of method rules")
    frame = pd.DataFrame(rows)
    cpu = frame.pivot_table(index="method", columns="phase", values="cpu", aggfunc="sum")
    cpu = cpu.reindex(columns=["training", "scoring", "evaluation"]).fillna(0.0)
    cpu.columns = [f"{phase}_cpu_s" for phase in cpu.columns]
    cpu["total_cpu_s"] = cpu.sum(axis=1)
    cpu["jobs_wall_s"] = frame.groupby("method")["wall"].sum()
    return cpu.round(1).sort_values("total_cpu_s", ascending=False).reset_index()


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    rows = table.itertuples(index=False)
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    arguments = [a for a in argv[1:] if a != "--by-method"]
    directory = arguments[0] if arguments else "benchmarks"
    if "--by-method" in argv[1:]:
        print(_markdown(method_timings(directory)))
        return
    print(_markdown(rule_timings(directory)))


if __name__ == "__main__":
    main(sys.argv)
