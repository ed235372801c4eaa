"""Write the subject-level splits of one dataset: the download's own folds where its sheet
carries them (``release_split``, e.g. cddpm_release) and ``splits.source`` allows, else drawn."""

from brainuad.data.sheet import RELEASE_SPLIT, read_sheet
from brainuad.errors import InputError
from brainuad.slices.splits import healthy_splits, lesion_splits, release_splits, write_splits
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    options = params.splits
    source = options.get("source", "auto")
    sheet = read_sheet(snakemake.input.sheet)
    sheet = sheet[sheet["subject"].isin(params.subjects)]
    has_release = RELEASE_SPLIT in sheet.columns and (sheet[RELEASE_SPLIT] != "").all()
    if source == "release" and not has_release:
        raise InputError(
            f"{snakemake.input.sheet}: splits.source is 'release' but this dataset's download "
            "ships no splits (only cddpm_release does); use splits.source: auto"
        )
    if has_release and source != "draw":
        table = release_splits(
            dict(zip(sheet["subject"], sheet[RELEASE_SPLIT], strict=True)),
            n_folds=options["n_folds"],
            where=str(snakemake.input.sheet),
        )
        log.info("the release's own splits (splits.source: %s)", source)
    elif params.healthy:
        table = healthy_splits(
            params.subjects,
            n_folds=options["n_folds"],
            test_fraction=options.get("healthy_test_fraction", 0.25),
            seed=params.seed,
        )
    else:
        table = lesion_splits(
            params.subjects,
            n_folds=options["n_folds"],
            val_fraction=options.get("lesion_val_fraction", 0.3),
            train_fraction=options.get("lesion_train_fraction", 0.0),
            seed=params.seed,
        )
    write_splits(table, snakemake.output[0])
    log.info("splits:\n%s", table.groupby(["fold", "split"]).size())
