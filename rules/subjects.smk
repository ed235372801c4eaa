# The subject sheet of each dataset, and the input functions that read it.
# A checkpoint: which subjects a dataset has, and which files each has, is known only
# once its folder has been scanned and every file read (bad files fail here, first).


checkpoint subject_sheet:
    output:
        "results/subjects/{dataset}.tsv",
    log:
        "logs/subject_sheet/{dataset}.log",
    benchmark:
        "benchmarks/subject_sheet/{dataset}.tsv"
    conda:
        "../envs/preprocessing.yaml"
    threads: 4
    params:
        spec=dataset_spec,
        sequences=dataset_sequences_of_wildcard,
        same_grid=dataset_same_grid,
        file_pattern=synthetic_file_pattern,
    script:
        "../workflow_scripts/subject_sheet.py"


rule subjects:
    input:
        expand("results/subjects/{dataset}.tsv", dataset=DATASETS),
