# QC of each lesion cohort's volumes against the published statistics of the dataset it
# imitates (docs/synthetic.md); the input functions are in common_synthetic.smk.


rule lesion_volume_qc:
    input:
        synthetic_metadata,
    output:
        table=report(
            "results/qc/lesion_volumes/{dataset}.md",
            caption="../report/captions/lesion_volume_table.rst",
            category="Data QC",
            subcategory="Lesion volumes",
            labels={"dataset": "{dataset}", "item": "table"},
        ),
        csv="results/qc/lesion_volumes/{dataset}.csv",
        figure=report(
            "results/qc/lesion_volumes/{dataset}.png",
            caption="../report/captions/lesion_volume_figure.rst",
            category="Data QC",
            subcategory="Lesion volumes",
            labels={"dataset": "{dataset}", "item": "figure"},
        ),
    log:
        "logs/lesion_volume_qc/{dataset}.log",
    conda:
        "../envs/reporting.yaml"
    params:
        lesion=synthetic_lesion,
        settings=synthetic_lesion_settings,
    script:
        "../workflow_scripts/lesion_volume_qc.py"
