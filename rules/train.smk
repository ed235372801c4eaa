# Train each method on each fold, stage by stage, with the one shared loop. Resumable: the
# checkpoint lives outside the rule's outputs, so a killed or pre-empted job continues on
# re-run. The final stage of every method is `train_model` (model.pt, as for a one-stage
# method); earlier stages (e.g. cDDPM's SparK pretraining) are `train_stage` jobs whose
# files the later stages name as inputs. What each stage reads follows the supervision it
# declares (see stage_inputs in common.smk). Params hold only what determines training:
# Snakemake reruns a job when a param changes, so the whole config (recorded in the
# stage's config.json) is read from `snakemake.config` instead.


rule train_model:
    input:
        unpack(final_stage_inputs),
    output:
        model="results/models/{method}/fold{fold}/model.pt",
        train_log=report(
            "results/models/{method}/fold{fold}/train_log.csv",
            category="Training",
            subcategory="{method}",
            labels={"method": "{method}", "fold": "{fold}", "file": "training log"},
        ),
        run_config="results/models/{method}/fold{fold}/config.json",
    log:
        "logs/train_model/{method}/fold{fold}.log",
    benchmark:
        "benchmarks/train_model/{method}/fold{fold}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=runtime_per_attempt(60),
    params:
        stage="model",
        stage_config=final_stage_config,
        checkpoint_dir="results/checkpoints/{method}/fold{fold}",
        seed=config["seed"],
        device=config.get("device", "auto"),
    script:
        "../workflow_scripts/train_model.py"


rule train_stage:
    input:
        unpack(stage_inputs),
    output:
        model="results/models/{method}/fold{fold}/{stage}.pt",
        train_log="results/models/{method}/fold{fold}/{stage}_train_log.csv",
        run_config="results/models/{method}/fold{fold}/{stage}_config.json",
    log:
        "logs/train_stage/{method}/fold{fold}/{stage}.log",
    benchmark:
        "benchmarks/train_stage/{method}/fold{fold}/{stage}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=runtime_per_attempt(60),
    params:
        stage="{stage}",
        stage_config=stage_config,
        checkpoint_dir="results/checkpoints/{method}/fold{fold}/{stage}",
        seed=config["seed"],
        device=config.get("device", "auto"),
    script:
        "../workflow_scripts/train_model.py"
