"""Choose the thresholds of one method and fold on validation data only."""

import json

from brainuad.evaluation.evaluate import calibrate_from_scores
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.io.atomic import write_text_atomic
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    evaluation = snakemake.params.evaluation
    inputs = snakemake.input
    lesion_val = {
        key.split("__", 1)[1]: (inputs[f"lesion_val_slices__{key.split('__', 1)[1]}"], path)
        for key, path in inputs.items()
        if key.startswith("lesion_val_scores__")
    }
    record = calibrate_from_scores(
        healthy_val=[(inputs.healthy_val_slices, inputs.healthy_val_scores)],
        lesion_val=lesion_val,
        postprocess=PostprocessConfig.from_dict(snakemake.params.postprocess),
        fprs=evaluation.get("healthy_fprs", [0.05, 0.01]),
    )
    write_text_atomic(snakemake.output[0], json.dumps(record, indent=2, default=str))
    for name, entry in record["thresholds"].items():
        log.info("%s: threshold %.5g on %s", name, entry["threshold"], entry["chosen_on"])
