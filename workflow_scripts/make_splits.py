"""Write the subject-level splits of one dataset."""

from brainuad.slices.splits import healthy_splits, lesion_splits, write_splits
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    options = params.splits
    if params.healthy:
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
