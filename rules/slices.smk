# Slices to HDF5 (one file per dataset) and subject-level splits.


rule extract_slices:
    input:
        unpack(slices_inputs),
        sheet="results/subjects/{dataset}.tsv",
    output:
        "results/slices/{dataset}.h5",
    log:
        "logs/extract_slices/{dataset}.log",
    benchmark:
        "benchmarks/extract_slices/{dataset}.tsv"
    conda:
        "../envs/preprocessing.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        subjects=subjects_of_wildcard,
        sequences=slice_sequences_of_wildcard,
        size=config["slices"]["size"],
        min_brain_fraction=config["slices"].get("min_brain_fraction", 0.25),
        min_lesion_pixels=config["slices"].get("min_lesion_pixels", 1),
        preprocess=dataset_preprocess_of_wildcard,
        labels=dataset_labels_of_wildcard,
    script:
        "../workflow_scripts/extract_slices.py"


rule make_splits:
    input:
        sheet="results/subjects/{dataset}.tsv",
    output:
        "results/splits/{dataset}.csv",
    log:
        "logs/make_splits/{dataset}.log",
    conda:
        "../envs/preprocessing.yaml"
    params:
        subjects=subjects_of_wildcard,
        healthy=is_healthy_dataset,
        splits=config["splits"],
        seed=config["seed"],
    script:
        "../workflow_scripts/make_splits.py"
