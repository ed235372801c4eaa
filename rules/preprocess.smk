# Preprocess each subject: RAS, resample, N4, skull-strip, register to MNI152,
# normalise, crop; QC png and record. Then a QC table per dataset.


rule preprocess_subject:
    input:
        unpack(standard_images),
        seg="results/standard/{dataset}/{subject}/seg.nii.gz",
        truth_brainmask="results/standard/{dataset}/{subject}/brainmask_truth.nii.gz",
        template_t1="results/template/mni152_t1.nii.gz",
        template_brainmask="results/template/mni152_brainmask.nii.gz",
    output:
        images=expand(
            "results/preprocessed/{{dataset}}/{{subject}}/{sequence}.nii.gz",
            sequence=SEQUENCES,
        ),
        brainmask="results/preprocessed/{dataset}/{subject}/brainmask.nii.gz",
        seg="results/preprocessed/{dataset}/{subject}/seg.nii.gz",
        qc_png="results/preprocessed/{dataset}/{subject}/qc.png",
        qc_json="results/preprocessed/{dataset}/{subject}/qc.json",
    log:
        "logs/preprocess_subject/{dataset}/{subject}.log",
    benchmark:
        "benchmarks/preprocess_subject/{dataset}/{subject}.tsv"
    conda:
        "../envs/preprocessing.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=runtime_per_attempt(30),
    params:
        sequences=SEQUENCES,
        options=preprocess_params,
    script:
        "../workflow_scripts/preprocess_subject.py"


rule qc_table:
    input:
        qc_records,
    output:
        "results/qc/{dataset}.csv",
    log:
        "logs/qc_table/{dataset}.log",
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow_scripts/qc_table.py"
