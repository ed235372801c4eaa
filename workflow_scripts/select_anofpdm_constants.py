"""AnoFPDM's label-free constants (thr_cos, diff_max) of one fold, chosen on the validation
slices of its training cohorts with slice labels only: selection.json."""

from brainuad.methods import import_method_modules
from brainuad.methods.anofpdm import select_for_fold
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0], threads=snakemake.threads) as log:
    import_method_modules(snakemake.config.get("method_modules", []))
    datasets = snakemake.params.datasets
    entry = select_for_fold(
        model_path=snakemake.input.model,
        sources=[
            (snakemake.input[f"slices__{d}"], snakemake.input[f"splits__{d}"]) for d in datasets
        ],
        fold=int(snakemake.wildcards.fold),
        out_path=snakemake.output[0],
        inputs=snakemake.params.score_config["inputs"],
        size=snakemake.params.score_config["size"],
        batch_size=snakemake.params.batch_size,
        device=snakemake.params.device,
    )
    log.info("selection: %s", entry["constants"])
