"""Train one method on one fold (resumes from its checkpoint after a kill)."""

from brainuad.training.fold import train_fold
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    params = snakemake.params
    method_config = params.method_config
    summary = train_fold(
        method_name=snakemake.wildcards.method,
        model_hparams=method_config.get("model", {}),
        training=method_config.get("training", {}),
        slice_path=snakemake.input.slices,
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        checkpoint_dir=params.checkpoint_dir,
        out_model=snakemake.output.model,
        out_log=snakemake.output.train_log,
        out_config=snakemake.output.run_config,
        seed=params.seed,
        device=params.device,
        # The whole config, for the record only: as a param it would make every config
        # edit rerun training (Snakemake compares params to decide what to rerun).
        study_config=snakemake.config,
    )
    log.info("training summary: %s", summary)
