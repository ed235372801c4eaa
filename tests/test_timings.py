"""The per-rule summary of Snakemake benchmark files."""

from pathlib import Path

import pytest

from brainuad.timings import rule_timings

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write(path: Path, seconds: float, cpu: float, rss: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_rule_timings_sums_per_rule(tmp_path: Path) -> None:
    write(tmp_path / "train_model" / "ae" / "fold0.tsv", 10.0, 8.0, 500.0)
    write(tmp_path / "train_model" / "ae" / "fold1.tsv", 30.0, 20.0, 700.0)
    write(tmp_path / "plot_figures.tsv", 5.0, 4.0, 100.0)
    table = rule_timings(tmp_path).set_index("rule")
    assert table.loc["train_model", "jobs"] == 2
    assert table.loc["train_model", "wall_total_s"] == 40.0
    assert table.loc["train_model", "wall_mean_s"] == 20.0
    assert table.loc["train_model", "cpu_total_s"] == 28.0
    assert table.loc["train_model", "max_rss_mb"] == 700.0
    assert table.loc["plot_figures", "jobs"] == 1


def test_rule_timings_without_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no benchmark files"):
        rule_timings(tmp_path)
