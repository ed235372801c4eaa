# Score val/test slices, calibrate thresholds on validation data only, and compute
# per-subject 3D metrics on the test splits.


rule score_dataset:
    input:
        unpack(score_inputs),
    output:
        val="results/scores/{method}/fold{fold}/{dataset}_val.h5",
        test="results/scores/{method}/fold{fold}/{dataset}_test.h5",
    log:
        "logs/score_dataset/{method}/fold{fold}/{dataset}.log",
    benchmark:
        "benchmarks/score_dataset/{method}/fold{fold}/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=runtime_per_attempt(30),
    params:
        batch_size=score_batch_size,
        score_config=score_config,
        device=config.get("device", "auto"),
    script:
        "../workflow_scripts/score_dataset.py"


rule calibrate_threshold:
    input:
        unpack(calibration_inputs),
    output:
        "results/calibration/{method}/fold{fold}/threshold.json",
    log:
        "logs/calibrate_threshold/{method}/fold{fold}.log",
    benchmark:
        "benchmarks/calibrate_threshold/{method}/fold{fold}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        healthy_fprs=config["evaluation"]["healthy_fprs"],
        lesion_datasets=calibration_lesion_datasets,
        postprocess=postprocess_config,
        evaluation=EVALUATION_GRID,
        best_dice_search=config["evaluation"]["best_dice_search"],
        fpr_region=config["evaluation"]["healthy_fpr_region"],
        fpr_pooling=config["evaluation"]["healthy_fpr_pooling"],
    script:
        "../workflow_scripts/calibrate_threshold.py"


rule select_anofpdm_constants:
    input:
        unpack(selection_inputs),
    output:
        "results/calibration/{method}/fold{fold}/selection.json",
    log:
        "logs/select_anofpdm_constants/{method}/fold{fold}.log",
    benchmark:
        "benchmarks/select_anofpdm_constants/{method}/fold{fold}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=runtime_per_attempt(30),
    params:
        datasets=selection_datasets,
        batch_size=score_batch_size,
        score_config=score_config,
        device=config.get("device", "auto"),
    script:
        "../workflow_scripts/select_anofpdm_constants.py"


rule subject_metrics:
    input:
        unpack(feature_weights),
        scores="results/scores/{method}/fold{fold}/{dataset}_test.h5",
        slices="results/slices/{dataset}.h5",
        thresholds="results/calibration/{method}/fold{fold}/threshold.json",
        healthy_slices=f"results/slices/{HEALTHY_DATASET}.h5",
        healthy_splits=f"results/splits/{HEALTHY_DATASET}.csv",
    output:
        table="results/metrics/{method}/fold{fold}/{dataset}.csv",
        summary="results/metrics/{method}/fold{fold}/{dataset}.json",
    log:
        "logs/subject_metrics/{method}/fold{fold}/{dataset}.log",
    benchmark:
        "benchmarks/subject_metrics/{method}/fold{fold}/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        image_score=config["evaluation"]["image_score"],
        postprocess=postprocess_config,
        resolution_mm=config["preprocess"]["resolution_mm"],
        slice_size=config["slices"]["size"],
        crop_shape=config["preprocess"]["crop_shape"],
        evaluation=EVALUATION_GRID,
    script:
        "../workflow_scripts/subject_metrics.py"
