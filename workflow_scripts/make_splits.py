"""Write the subject-level splits of one dataset: the download's own folds where its sheet
carries them (``release_split``, cddpm_release) and ``splits.source`` allows, else drawn."""

from brainuad.data.sheet import RELEASE_SPLIT, read_sheet
from brainuad.slices.splits import dataset_splits, write_splits
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    sheet = read_sheet(snakemake.input.sheet)
    release = (
        dict(zip(sheet["subject"], sheet[RELEASE_SPLIT], strict=True))
        if RELEASE_SPLIT in sheet.columns
        else None
    )
    table = dataset_splits(
        params.subjects,
        release=release,
        healthy=params.healthy,
        options=params.splits,
        seed=params.seed,
        where=str(snakemake.input.sheet),
        dataset=snakemake.wildcards.dataset,
    )
    if release is not None:
        log.info("the download ships folds; splits.source: %s", params.splits.get("source", "auto"))
    write_splits(table, snakemake.output[0])
    log.info("splits:\n%s", table.groupby(["fold", "split"]).size())
