# Aggregate per-subject metrics into paper tables and figures; named targets `tables`,
# `figures` and `report` rebuild them from existing metrics without retraining.


rule aggregate_tables:
    input:
        metrics=metrics_files(),
        summaries=metrics_summaries(),
    output:
        main_csv="results/tables/main.csv",
        main_md=report(
            "results/tables/main.md",
            caption="../report/captions/main_table.rst",
            category="Tables",
            labels={"table": "main"},
        ),
        main_tex="results/tables/main.tex",
        prevalence="results/tables/prevalence.csv",
        by_metric=report(
            directory("results/tables/by_metric"),
            patterns=["{table}.md"],
            caption="../report/captions/metric_table.rst",
            category="Tables",
            subcategory="By metric",
            labels={"table": "{table}"},
        ),
    log:
        "logs/aggregate_tables.log",
    conda:
        "../envs/reporting.yaml"
    params:
        default_protocol=config["evaluation"]["default_protocol"],
        main_protocols=MAIN_PROTOCOLS,
        methods=METHODS,
        datasets=DATASETS,
        metric_keys=METRIC_KEYS,
        lesion_datasets=LESION_DATASETS,
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
    log:
        "logs/plot_figures.log",
    benchmark:
        "benchmarks/plot_figures.tsv"
    conda:
        "../envs/reporting.yaml"
    params:
        default_protocol=config["evaluation"]["default_protocol"],
        examples_per_dataset=config["evaluation"]["qualitative_examples_per_dataset"],
        postprocess=postprocess_by_method(),
        evaluation=EVALUATION_GRID,
        methods=METHODS,
        trained_methods=TRAINED_METHODS,
        folds=FOLDS,
        datasets=DATASETS,
        metric_keys=METRIC_KEYS,
        lesion_datasets=LESION_DATASETS,
        figures=FIGURES,
    script:
        "../workflow_scripts/plot_figures.py"


rule tables:
    input:
        rules.aggregate_tables.output,


rule figures:
    input:
        rules.plot_figures.output,


# Everything the HTML report shows; then: snakemake --report results/report.html
rule report:
    input:
        rules.aggregate_tables.output,
        rules.plot_figures.output,
        lesion_volume_qc_targets(),
