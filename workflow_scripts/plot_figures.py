"""Draw the study's figures from existing metrics, scores and training logs."""

from itertools import product

from brainuad.evaluation.aggregate import build_figures
from brainuad.evaluation.grid import EvaluationConfig
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]):
    params = snakemake.params
    inputs, output = snakemake.input, snakemake.output
    by_run = list(product(params.methods, params.folds))
    # Training-free methods have no training log.
    trained_runs = list(product(params.trained_methods, params.folds))
    # (method, fold, dataset) in the order of the inputs: each method on its datasets.
    by_dataset = [tuple(key) for key in params.metric_keys]
    build_figures(
        metric_paths=dict(zip(by_dataset, inputs.metrics, strict=True)),
        train_logs=dict(zip(trained_runs, inputs.train_logs, strict=True)),
        test_scores=dict(zip(by_dataset, inputs.scores, strict=True)),
        slices=dict(zip(params.datasets, inputs.slices, strict=True)),
        thresholds=dict(zip(by_run, inputs.thresholds, strict=True)),
        outputs={name: (output[f"{name}_png"], output[f"{name}_pdf"]) for name in params.figures},
        lesion_datasets=params.lesion_datasets,
        methods=params.methods,
        default_protocol=params.default_protocol,
        postprocess={
            method: PostprocessConfig.from_dict(options)
            for method, options in params.postprocess.items()
        },
        examples_per_dataset=params.examples_per_dataset,
        evaluation=EvaluationConfig.from_dict(params.evaluation),
    )
