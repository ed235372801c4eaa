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


# Significance between methods: paired Wilcoxon tests (Holm) and bootstrap confidence
# intervals over the test subjects of each lesion cohort (brainuad.evaluation.significance).
rule significance_tables:
    input:
        metrics=metrics_files(),
    output:
        tests_csv="results/tables/significance.csv",
        tests_md=report(
            "results/tables/significance.md",
            caption="../report/captions/significance_table.rst",
            category="Tables",
            labels={"table": "significance"},
        ),
        tests_tex="results/tables/significance.tex",
        intervals_csv="results/tables/confidence_intervals.csv",
        intervals_md=report(
            "results/tables/confidence_intervals.md",
            caption="../report/captions/confidence_intervals_table.rst",
            category="Tables",
            labels={"table": "confidence intervals"},
        ),
        intervals_tex="results/tables/confidence_intervals.tex",
    log:
        "logs/significance_tables.log",
    conda:
        "../envs/reporting.yaml"
    params:
        settings=config["evaluation"]["significance"],
        seed=config["seed"],
        metrics=SIGNIFICANCE_METRICS,
        methods=METHODS,
        datasets=LESION_DATASETS,
        metric_keys=METRIC_KEYS,
    script:
        "../workflow_scripts/significance_tables.py"


rule plot_significance:
    input:
        tests="results/tables/significance.csv",
    output:
        png=report(
            "results/figures/significance.png",
            caption="../report/captions/significance_figure.rst",
            category="Figures",
            labels={"figure": "significance"},
        ),
        pdf="results/figures/significance.pdf",
    log:
        "logs/plot_significance.log",
    conda:
        "../envs/reporting.yaml"
    params:
        alpha=config["evaluation"]["significance"]["alpha"],
        methods=METHODS,
        datasets=LESION_DATASETS,
        metrics=SIGNIFICANCE_METRICS,
    script:
        "../workflow_scripts/plot_significance.py"


rule tables:
    input:
        rules.aggregate_tables.output,
        rules.significance_tables.output,


rule figures:
    input:
        rules.plot_figures.output,
        rules.plot_significance.output,


# Everything the HTML report shows; then: snakemake --report results/report.html
rule report:
    input:
        rules.aggregate_tables.output,
        rules.significance_tables.output,
        rules.plot_figures.output,
        rules.plot_significance.output,
        lesion_volume_qc_targets(),
