"""Paired tests between methods and bootstrap confidence intervals (CSV, Markdown, LaTeX)."""

from brainuad.evaluation.significance import SignificanceSettings, build_significance_tables
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params, output = snakemake.params, snakemake.output
    # (method, fold, dataset) in the order of the inputs: each method on its datasets.
    keys = [tuple(key) for key in params.metric_keys]
    tests, intervals = build_significance_tables(
        metric_paths=dict(zip(keys, snakemake.input.metrics, strict=True)),
        metrics=params.metrics,
        datasets=params.datasets,
        settings=SignificanceSettings.from_dict(params.settings),
        seed=params.seed,
        significance_stem=output.tests_csv.removesuffix(".csv"),
        intervals_stem=output.intervals_csv.removesuffix(".csv"),
        method_order=params.methods,
    )
    log.info(
        "%d pairs tested (%d untested), %d significant; %d confidence intervals",
        int(tests["p_value"].notna().sum()),
        int(tests["p_value"].isna().sum()),
        int(tests["significant"].sum()),
        len(intervals),
    )
