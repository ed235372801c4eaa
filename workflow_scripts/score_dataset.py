"""Anomaly maps of one method and fold for one dataset's val and test splits."""

from brainuad.methods import import_method_modules
from brainuad.scoring import score_dataset_splits
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    # A study's own methods (config `method_modules`) register on import.
    import_method_modules(snakemake.config.get("method_modules", []))
    wildcards = snakemake.wildcards
    score_config = snakemake.params.score_config
    summaries = score_dataset_splits(
        model_path=snakemake.input.get("model"),
        slice_path=snakemake.input.slices,
        splits_path=snakemake.input.splits,
        fold=int(wildcards.fold),
        out_paths={"val": snakemake.output.val, "test": snakemake.output.test},
        batch_size=snakemake.params.batch_size,
        device=snakemake.params.device,
        attrs={"method": wildcards.method, "dataset": wildcards.dataset},
        inputs=score_config["inputs"],
        size=score_config["size"],
        build=score_config.get("build"),
    )
    for split, summary in summaries.items():
        log.info("scoring summary (%s): %s", split, summary)
