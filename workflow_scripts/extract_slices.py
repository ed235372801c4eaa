"""Extract the axial slices of every subject of one dataset into its HDF5 slice file."""

import brainuad
from brainuad.slices.extract import build_slice_file
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    params = snakemake.params
    names = [*params.sequences, "brainmask", "seg"]
    dataset = snakemake.wildcards.dataset
    subjects = {
        subject: {name: snakemake.input[f"{subject}__{name}"] for name in names}
        for subject in params.subjects
    }
    summary = build_slice_file(
        out_path=snakemake.output[0],
        subjects=subjects,
        sequences=params.sequences,
        size=params.size,
        min_brain_fraction=params.min_brain_fraction,
        min_lesion_pixels=params.min_lesion_pixels,
        lesion_labels=params.labels["lesion"],
        ignore_labels=params.labels["ignore"],
        attrs={
            "dataset": dataset,
            "preprocess": params.preprocess,
            "brainuad_version": brainuad.__version__,
        },
    )
    log.info("slices: %s", summary)
