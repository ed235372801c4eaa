"""Per-subject 3D metrics of one method, fold and dataset's test split."""

import json

from brainuad.evaluation.calibration import THRESHOLD_FILE
from brainuad.evaluation.evaluate import evaluate_test_split
from brainuad.evaluation.grid import EvaluationConfig
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.io.atomic import atomic_path, write_text_atomic
from brainuad.io.readers import read_json
from brainuad.provenance import provenance
from brainuad.slices.extract import slice_voxel_spacing
from brainuad.slices.splits import read_splits, subjects_in
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params, inputs, wildcards = snakemake.params, snakemake.input, snakemake.wildcards
    fold = int(wildcards.fold)
    table, summary = evaluate_test_split(
        slice_path=inputs.slices,
        scores_path=inputs.scores,
        threshold_record=read_json(inputs.thresholds, THRESHOLD_FILE),
        dataset=wildcards.dataset,
        postprocess=PostprocessConfig.from_dict(params.postprocess),
        image_score=params.image_score,
        spacing=slice_voxel_spacing(
            resolution_mm=params.resolution_mm,
            volume_shape=params.crop_shape,
            size=params.slice_size,
        ),
        healthy_slice_path=inputs.healthy_slices,
        healthy_train_subjects=subjects_in(
            read_splits(inputs.healthy_splits), fold=fold, split="train"
        ),
        lpips_weights=inputs.get("lpips_weights"),
        inception_weights=inputs.get("inception_weights"),
        evaluation=EvaluationConfig.from_dict(params.evaluation),
    )
    if summary["evaluation"]["absent_slices"]:
        log.warning(
            "%d slices of the reference grid's central extent are not in %s (no brain, or "
            "below slices.min_brain_fraction): evaluated as zero map without lesion",
            summary["evaluation"]["absent_slices"],
            inputs.slices,
        )
    for name, entry in summary["feature_metrics"].items():
        if entry["skipped"]:
            log.warning("%s skipped: %s", name, entry["skipped"])
    summary = {
        "method": wildcards.method,
        "fold": fold,
        **summary,
        "provenance": provenance(snakemake.config),
    }
    with atomic_path(snakemake.output.table) as tmp:
        table.to_csv(tmp, index=False)
    write_text_atomic(snakemake.output.summary, json.dumps(summary, indent=2, default=str))
    log.info("metrics of %d subjects; slice level %s", len(table), summary["slice_level"])
