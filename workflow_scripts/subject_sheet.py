"""Discover one dataset's subjects, validate their files and write its subject sheet."""

from brainuad.data.sheet import build_sheet, write_sheet
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    spec = snakemake.params.spec
    sheet = build_sheet(
        source=spec["source"],
        sequences=snakemake.params.sequences,
        path=spec.get("path"),
        n_subjects=spec.get("n_subjects"),
        lesion=spec["lesion"],
        file_pattern=snakemake.params.file_pattern,
        same_grid=snakemake.params.same_grid,
        threads=snakemake.threads,
        layout=spec.get("layout") or None,
    )
    write_sheet(sheet.table, snakemake.output[0])
    log.info("%s: %d subjects in the sheet", snakemake.wildcards.dataset, len(sheet.table))
    for source_id, reason in sheet.skipped:
        log.warning("skipped %s: %s", source_id, reason)
