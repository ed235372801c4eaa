"""Preprocess one subject (see brainuad.preprocess.preprocess_subject)."""

import json

from brainuad.io.atomic import write_text_atomic
from brainuad.preprocess import preprocess_subject
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    sequences = snakemake.params.sequences
    options = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in snakemake.params.options.items()
    }
    record = preprocess_subject(
        images={sequence: snakemake.input[sequence] for sequence in sequences},
        seg=snakemake.input.get("seg"),
        truth_brainmask=snakemake.input.get("brainmask_truth"),
        template_t1=snakemake.input.template_t1,
        template_brainmask=snakemake.input.template_brainmask,
        out_images=dict(zip(sequences, snakemake.output.images, strict=True)),
        out_brainmask=snakemake.output.brainmask,
        out_seg=snakemake.output.seg,
        out_qc_png=snakemake.output.qc_png,
        **options,
    )
    record.update(dataset=snakemake.wildcards.dataset, subject=snakemake.wildcards.subject)
    write_text_atomic(snakemake.output.qc_json, json.dumps(record, indent=2, default=str))
    log.info("QC: %s", record)
