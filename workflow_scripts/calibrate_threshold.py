"""Choose the thresholds of one method and fold on validation data only."""

import json

from brainuad.evaluation.evaluate import calibrate_from_scores
from brainuad.evaluation.grid import EvaluationConfig
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.io.atomic import write_text_atomic
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params, inputs = snakemake.params, snakemake.input
    record = calibrate_from_scores(
        healthy_val=[(inputs.healthy_val_slices, inputs.healthy_val_scores)],
        lesion_val={
            dataset: (
                inputs[f"lesion_val_slices__{dataset}"],
                inputs[f"lesion_val_scores__{dataset}"],
            )
            for dataset in params.lesion_datasets
        },
        postprocess=PostprocessConfig.from_dict(params.postprocess),
        fprs=params.healthy_fprs,
        evaluation=EvaluationConfig.from_dict(params.evaluation),
        best_dice_search=params.best_dice_search,
        fpr_region=params.fpr_region,
        fpr_pooling=params.fpr_pooling,
    )
    write_text_atomic(snakemake.output[0], json.dumps(record, indent=2, default=str))
    for name, entry in record["thresholds"].items():
        log.info("%s: threshold %.5g on %s", name, entry["threshold"], entry["chosen_on"])
