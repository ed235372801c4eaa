"""QC of one synthetic cohort's lesion volumes against the published statistics."""

import json
from pathlib import Path

from brainuad.data.lesion_qc import (
    Panel,
    comparison_markdown,
    lesion_volume_records,
    plot_lesion_volumes,
    save_png,
    target_quartiles,
    volume_comparison,
)
from brainuad.data.lesion_volumes import PUBLISHED_VOLUMES
from brainuad.io.atomic import atomic_path, write_text_atomic
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    dataset, lesion = snakemake.wildcards.dataset, snakemake.params.lesion
    metadata = {
        Path(path).parent.name: json.loads(Path(path).read_text()) for path in snakemake.input
    }
    records = lesion_volume_records(metadata)
    target = target_quartiles(lesion, snakemake.params.settings)
    comparison = volume_comparison(records["lesion_volume_ml"], target, PUBLISHED_VOLUMES[lesion])
    with atomic_path(snakemake.output.csv) as tmp:
        records.to_csv(tmp, index=False)
    write_text_atomic(
        snakemake.output.table, comparison_markdown(dataset, lesion, records, comparison)
    )
    title = f"{dataset} ({lesion}): {PUBLISHED_VOLUMES[lesion].dataset}"
    save_png(plot_lesion_volumes([Panel(title, records["lesion_volume_ml"], target)]),
             snakemake.output.figure)  # fmt: skip
    log.info(
        "%s: generated lesion-volume quartiles %s",
        dataset,
        comparison["generated"].round(2).tolist(),
    )
