"""Generate one synthetic subject and write it in the standard per-subject layout."""

import json

from brainuad.data.synthetic import generate_subject, subject_seed
from brainuad.io.atomic import write_text_atomic
from brainuad.io.nifti import save_nifti
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]) as log:
    wildcards = snakemake.wildcards
    seed = subject_seed(snakemake.params.seed, wildcards.dataset, wildcards.subject)
    options = {
        k: tuple(v) if isinstance(v, list) else v for k, v in snakemake.params.synthetic.items()
    }
    lesion_settings = snakemake.params.lesion_settings
    if "volume_ml" in lesion_settings:
        volume = lesion_settings["volume_ml"]
        options["lesion_volume_ml"] = (volume["q1"], volume["median"], volume["q3"])
    if "edge_mm" in lesion_settings:
        options["lesion_edge_mm"] = lesion_settings["edge_mm"]
    if snakemake.params.lesion != "none":
        options["lesion_volume_quantile"] = snakemake.params.lesion_volume_quantile
    subject = generate_subject(
        seed=seed,
        lesion=snakemake.params.lesion,
        sequences=tuple(snakemake.params.sequences),
        **options,
    )
    for sequence, path in zip(snakemake.params.sequences, snakemake.output.images, strict=True):
        image = subject.images[sequence]
        save_nifti(image.get_fdata(dtype="float32"), image.affine, path)
    save_nifti(subject.seg.get_fdata().astype("uint8"), subject.seg.affine, snakemake.output.seg)
    truth = subject.brainmask
    save_nifti(truth.get_fdata().astype("uint8"), truth.affine, snakemake.output.truth_brainmask)
    write_text_atomic(
        snakemake.output.metadata, json.dumps(subject.metadata, indent=2, default=str)
    )
    log.info("generated %s/%s with seed %d", wildcards.dataset, wildcards.subject, seed)
