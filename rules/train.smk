# Train each method on each fold's healthy training slices. Resumable: the checkpoint
# lives outside the rule's outputs, so a killed or pre-empted job continues on re-run.
# Params hold only what determines training: Snakemake reruns a job when a param changes,
# so the whole config (recorded in config.json) is read from `snakemake.config` instead.


rule train_model:
    input:
        slices=f"results/slices/{HEALTHY_DATASET}.h5",
        splits=f"results/splits/{HEALTHY_DATASET}.csv",
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
        method_config=method_training_config,
        checkpoint_dir="results/checkpoints/{method}/fold{fold}",
        seed=config["seed"],
        device=config.get("device", "auto"),
    script:
        "../workflow_scripts/train_model.py"
