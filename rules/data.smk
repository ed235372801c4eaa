# Ingest. Real datasets are read where they were downloaded (their subject sheets point
# at the files, see rules/subjects.smk); the embedded synthetic cohort is generated into
# the standard per-subject layout, which its sheet points at.


rule template_files:
    output:
        t1="results/template/mni152_t1.nii.gz",
        brainmask="results/template/mni152_brainmask.nii.gz",
    log:
        "logs/template_files.log",
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow_scripts/template_files.py"


rule generate_synthetic_subject:
    output:
        images=expand(
            "results/standard/{{dataset}}/{{subject}}/{sequence}.nii.gz",
            sequence=SEQUENCES,
        ),
        seg="results/standard/{dataset}/{subject}/seg.nii.gz",
        truth_brainmask="results/standard/{dataset}/{subject}/brainmask_truth.nii.gz",
        metadata="results/standard/{dataset}/{subject}/metadata.json",
    log:
        "logs/generate_synthetic_subject/{dataset}/{subject}.log",
    benchmark:
        "benchmarks/generate_synthetic_subject/{dataset}/{subject}.tsv"
    wildcard_constraints:
        dataset="|".join(SYNTHETIC_DATASETS) or "(?!)",
    conda:
        "../envs/preprocessing.yaml"
    params:
        lesion=synthetic_lesion,
        sequences=SEQUENCES,
        seed=config["seed"],
        synthetic=synthetic_options,
        lesion_settings=synthetic_lesion_settings,
        lesion_volume_quantile=synthetic_volume_quantile,
        generator_version=SYNTHETIC_GENERATOR_VERSION,
    script:
        "../workflow_scripts/generate_synthetic_subject.py"
