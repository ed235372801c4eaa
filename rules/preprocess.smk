# Preprocess each subject: RAS, resample, N4, skull-strip, register to the template,
# normalise, crop; QC png and record. Then a QC table per dataset.
# One rule per set of sequences (see preprocess_groups): a dataset carries only its own.

for preprocess_rule, preprocess_sequences, preprocess_datasets in preprocess_groups():

    rule:
        name:
            preprocess_rule
        input:
            unpack(preprocess_inputs),
        output:
            images=expand(
                "results/preprocessed/{{dataset}}/{{subject}}/{sequence}.nii.gz",
                sequence=preprocess_sequences,
            ),
            brainmask="results/preprocessed/{dataset}/{subject}/brainmask.nii.gz",
            seg="results/preprocessed/{dataset}/{subject}/seg.nii.gz",
            qc_png="results/preprocessed/{dataset}/{subject}/qc.png",
            qc_json="results/preprocessed/{dataset}/{subject}/qc.json",
        log:
            "logs/preprocess_subject/{dataset}/{subject}.log",
        benchmark:
            "benchmarks/preprocess_subject/{dataset}/{subject}.tsv"
        wildcard_constraints:
            dataset="|".join(preprocess_datasets),
        conda:
            "../envs/preprocessing.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=runtime_per_attempt(30),
        params:
            sequences=preprocess_sequences,
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
