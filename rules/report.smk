# Aggregate per-subject metrics into paper tables and figures; named targets `tables`,
# `figures` and `report` rebuild them from existing metrics without retraining.


rule aggregate_tables:
    input:
        metrics=metrics_files(),
    output:
        main_csv="results/tables/main.csv",
        main_md=report(
            "results/tables/main.md",
            caption="../report/captions/main_table.rst",
            category="Tables",
            labels={"table": "main"},
        ),
        main_tex="results/tables/main.tex",
        by_metric=directory("results/tables/by_metric"),
    conda:
        "../envs/reporting.yaml"
    log:
        "logs/aggregate_tables.log",
    params:
        evaluation=config["evaluation"],
        methods=METHODS,
        folds=FOLDS,
        datasets=DATASETS,
    script:
        "../workflow_scripts/aggregate_tables.py"


rule plot_figures:
    input:
        metrics=metrics_files(),
        train_logs=training_logs(),
        scores=test_scores_files(),
        thresholds=expand(
            "results/calibration/{method}/fold{fold}/threshold.json",
            method=METHODS,
            fold=FOLDS,
        ),
        slices=expand("results/slices/{dataset}.h5", dataset=DATASETS),
    output:
        **figure_outputs(),
    conda:
        "../envs/reporting.yaml"
    log:
        "logs/plot_figures.log",
    benchmark:
        "benchmarks/plot_figures.tsv"
    params:
        evaluation=config["evaluation"],
        methods=METHODS,
        folds=FOLDS,
        datasets=DATASETS,
    script:
        "../workflow_scripts/plot_figures.py"


rule tables:
    default_target: False
    input:
        rules.aggregate_tables.output,


rule figures:
    input:
        rules.plot_figures.output,


rule report_inputs:
    input:
        rules.aggregate_tables.output,
        rules.plot_figures.output,
