"""Per-subject 3D metrics of one method, fold and dataset's test split."""

import json
from pathlib import Path

import numpy as np

from brainuad.evaluation.evaluate import (
    feature_metrics,
    subject_metrics_table,
    thresholds_for_dataset,
)
from brainuad.evaluation.postprocess import PostprocessConfig
from brainuad.io.atomic import atomic_path, write_text_atomic
from brainuad.provenance import provenance
from brainuad.slices.extract import slice_voxel_spacing
from brainuad.slices.hdf5 import SliceFile
from brainuad.slices.splits import read_splits, subjects_in
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    evaluation = params.evaluation
    fold = int(snakemake.wildcards.fold)
    spacing = slice_voxel_spacing(
        resolution_mm=params.resolution_mm, volume_shape=params.crop_shape, size=params.slice_size
    )
    thresholds = thresholds_for_dataset(
        json.loads(Path(snakemake.input.thresholds).read_text()), snakemake.wildcards.dataset
    )
    table, slice_level = subject_metrics_table(
        slice_path=snakemake.input.slices,
        scores_path=snakemake.input.scores,
        thresholds=thresholds,
        postprocess=PostprocessConfig.from_dict(snakemake.params.postprocess),
        image_score=evaluation.get("image_score", "max"),
        voxel_volume_ml=float(np.prod(spacing)) / 1000.0,
        spacing=spacing,
    )
    with atomic_path(snakemake.output.table) as tmp:
        table.to_csv(tmp, index=False)
    reference = SliceFile(snakemake.input.healthy_slices)
    features = feature_metrics(
        slice_path=snakemake.input.slices,
        scores_path=snakemake.input.scores,
        reference_slice_path=snakemake.input.healthy_slices,
        reference_rows=reference.rows_for_subjects(
            subjects_in(read_splits(snakemake.input.healthy_splits), fold=fold, split="train")
        ),
        lpips_weights=evaluation.get("lpips_weights"),
        inception_weights=evaluation.get("inception_weights"),
    )
    for name, entry in features.items():
        if entry["skipped"]:
            log.warning("%s skipped: %s", name, entry["skipped"])
    summary = {
        "method": snakemake.wildcards.method,
        "fold": fold,
        "dataset": snakemake.wildcards.dataset,
        "split": "test",
        "n_subjects": len(table),
        "means": table.drop(columns=["subject"]).mean(numeric_only=True).to_dict(),
        "slice_level": {k: v for k, v in slice_level.items() if k != "scores"},
        "feature_metrics": features,
        "thresholds": {name: entry["threshold"] for name, entry in thresholds.items()},
        "provenance": provenance(params.study_config),
    }
    write_text_atomic(snakemake.output.summary, json.dumps(summary, indent=2, default=str))
    log.info("metrics of %d subjects; slice level %s", len(table), summary["slice_level"])
