"""Summarise the per-job ``benchmarks/`` files of a run into a per-rule table.

``python -m brainuad.timings benchmarks`` prints, per rule, the number of jobs and their
wall-clock and CPU seconds (total, mean, max), as Markdown, for docs/benchmarks.md.
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


def main(argv: list[str]) -> None:
    directory = argv[1] if len(argv) > 1 else "benchmarks"
    table = rule_timings(directory)
    header = "| " + " | ".join(table.columns) + " |"
    print(header)
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(str(value) for value in row) + " |")


if __name__ == "__main__":
    main(sys.argv)
