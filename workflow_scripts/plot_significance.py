"""Figure of the pairwise significance outcomes from significance.csv."""

import pandas as pd

from brainuad.evaluation.figures import plot_pairwise_significance
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]):
    params = snakemake.params
    tests = pd.read_csv(snakemake.input.tests, keep_default_na=False, na_values=[""])
    plot_pairwise_significance(
        tests,
        snakemake.output.png,
        snakemake.output.pdf,
        method_order=params.methods,
        dataset_order=params.datasets,
        metric_order=params.metrics,
        alpha=params.alpha,
    )
