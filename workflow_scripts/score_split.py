"""Anomaly maps of one method and fold for one dataset's val or test split."""

from brainuad.methods import import_method_modules
from brainuad.scoring import score_dataset_split
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    # A study's own methods (config `method_modules`) register on import.
    import_method_modules(snakemake.config.get("method_modules", []))
    wildcards = snakemake.wildcards
    score_config = snakemake.params.score_config
    summary = score_dataset_split(
        model_path=snakemake.input.get("model"),
        slice_path=snakemake.input.slices,
        splits_path=snakemake.input.splits,
        fold=int(wildcards.fold),
        split=wildcards.split,
        out_path=snakemake.output[0],
        batch_size=snakemake.params.batch_size,
        device=snakemake.params.device,
        attrs={"method": wildcards.method, "dataset": wildcards.dataset},
        inputs=score_config["inputs"],
        size=score_config["size"],
        build=score_config.get("build"),
    )
    log.info("scoring summary: %s", summary)
