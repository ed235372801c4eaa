"""Aggregate per-subject metrics into the paper tables (CSV, Markdown, LaTeX)."""

import os

from brainuad.evaluation.aggregate import build_tables
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    # (method, fold, dataset) in the order of the inputs: each method on its datasets.
    keys = [tuple(key) for key in params.metric_keys]
    summary, paths = build_tables(
        metric_paths=dict(zip(keys, snakemake.input.metrics, strict=True)),
        by_metric_dir=snakemake.output.by_metric,
        main_dir=os.path.dirname(snakemake.output.main_md),
        default_protocol=params.default_protocol,
        main_protocols=params.main_protocols,
        method_order=params.methods,
        dataset_order=params.datasets,
        lesion_datasets=params.lesion_datasets,
        prevalence_path=snakemake.output.prevalence,
        summary_paths=dict(zip(keys, snakemake.input.summaries, strict=True)),
    )
    log.info("wrote %d tables", len(paths))
