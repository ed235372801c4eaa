"""Train one stage of one method on one fold (resumes from its checkpoint after a kill)."""

from brainuad.methods import import_method_modules
from brainuad.training.fold import TrainingCohort, train_fold
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    # A study's own methods (config `method_modules`) register on import.
    import_method_modules(snakemake.config.get("method_modules", []))
    params, inputs = snakemake.params, snakemake.input
    stage_config = params.stage_config
    summary = train_fold(
        method_name=stage_config["implementation"],
        variant=snakemake.wildcards.method,
        stage=params.stage,
        model_hparams=stage_config["model"],
        training=stage_config["training"],
        inputs=stage_config["inputs"],
        size=stage_config["size"],
        cohorts=[
            TrainingCohort(
                dataset=dataset,
                slice_path=inputs[f"slices__{dataset}"],
                splits_path=inputs[f"splits__{dataset}"],
                healthy_training_cohort=is_healthy,
            )
            for dataset, is_healthy in stage_config["datasets"].items()
        ],
        consumed={
            key.removeprefix("stage__"): path
            for key, path in inputs.items()
            if key.startswith("stage__")
        },
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
