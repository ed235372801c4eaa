# Input functions of the synthetic cohort (generator settings per job, lesion-volume QC),
# kept beside common.smk so that the synthetic cohort's pieces stay together.

from brainuad.data.lesion_volumes import cohort_quantiles
from brainuad.data.synthetic import GENERATOR_VERSION as SYNTHETIC_GENERATOR_VERSION


def synthetic_options(wildcards):
    """The `synthetic` block without `lesions`, whose settings go per lesion kind (so that
    editing one kind's settings regenerates only the cohorts of that kind)."""
    return {k: v for k, v in config.get("synthetic", {}).items() if k != "lesions"}


def synthetic_lesion_settings(wildcards):
    """synthetic.lesions.<kind> of the dataset's lesion kind ({} = published defaults)."""
    kind = config["datasets"][wildcards.dataset]["lesion"]
    return config.get("synthetic", {}).get("lesions", {}).get(kind, {})


def synthetic_volume_quantile(wildcards):
    """The subject's stratum of its cohort's lesion-volume distribution (see
    brainuad.data.lesion_volumes.cohort_quantiles), so that even a handful of subjects
    spans the distribution."""
    subjects = subjects_of(wildcards.dataset)
    quantiles = cohort_quantiles(config["seed"], wildcards.dataset, len(subjects))
    return round(float(quantiles[subjects.index(wildcards.subject)]), 6)


def synthetic_metadata(wildcards):
    return expand(
        "results/standard/{dataset}/{subject}/metadata.json",
        dataset=wildcards.dataset,
        subject=subjects_of(wildcards.dataset),
    )


def lesion_volume_qc_targets():
    """The synthetic lesion cohorts' volume QC (a real dataset has no generation record)."""
    return expand(
        "results/qc/lesion_volumes/{dataset}.{ext}",
        dataset=[d for d in LESION_DATASETS if d in SYNTHETIC_DATASETS],
        ext=("md", "png"),
    )
