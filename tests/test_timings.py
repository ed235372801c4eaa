"""The per-rule summary of Snakemake benchmark files."""

from pathlib import Path

import pytest

from brainuad.timings import method_timings, rule_timings

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


def test_method_timings_add_each_methods_phases(tmp_path: Path) -> None:
    write(tmp_path / "train_stage" / "cddpm" / "fold0" / "spark.tsv", 5.0, 4.0, 1.0)
    write(tmp_path / "train_model" / "cddpm" / "fold0.tsv", 10.0, 8.0, 1.0)
    write(tmp_path / "score_dataset" / "cddpm" / "fold0" / "synth_ixi.tsv", 3.0, 2.0, 1.0)
    write(tmp_path / "subject_metrics" / "cddpm" / "fold0" / "synth_brats.tsv", 2.0, 1.5, 1.0)
    write(tmp_path / "score_dataset" / "intensity" / "fold0" / "synth_ixi.tsv", 1.0, 0.5, 1.0)
    write(tmp_path / "preprocess_subject" / "synth_ixi" / "sub-000.tsv", 50.0, 40.0, 1.0)
    table = method_timings(tmp_path).set_index("method")
    assert set(table.index) == {"cddpm", "intensity"}  # never a dataset of a data rule
    assert table.loc["cddpm", "training_cpu_s"] == 12.0
    assert table.loc["cddpm", "scoring_cpu_s"] == 2.0
    assert table.loc["cddpm", "evaluation_cpu_s"] == 1.5
    assert table.loc["cddpm", "total_cpu_s"] == 15.5
    assert table.loc["cddpm", "jobs_wall_s"] == 20.0
    assert table.loc["intensity", "training_cpu_s"] == 0.0
    assert list(table.index) == ["cddpm", "intensity"]  # most expensive first
