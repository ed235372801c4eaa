# Config validation, wildcard constraints and every input function of the workflow.

from snakemake.utils import validate

from brainuad.config import (
    calibration_protocols,
    evaluation_grid,
    main_table_protocols,
    synthetic_subjects,
)
from brainuad.config_checks import check_study_config
from brainuad.methods import method_class
from brainuad.methods.base import FINAL_STAGE

from brainuad.data.datasets import (
    dataset_labels,
    dataset_path,
    dataset_preprocess,
    dataset_sequences,
    dataset_slice_sequences,
    preprocess_arguments,
    scored_datasets,
)
from brainuad.data.sheet import read_sheet, sheet_labels, subject_files
from brainuad.evaluation.significance import significance_metrics

# Schema (with defaults), cross-checks, methods, crop box, paths: one line per problem, so
# `snakemake -n` fails before any job runs (brainuad.config_checks).
check_study_config(config, os.path.join(workflow.basedir, "config", "schema.yaml"))


DATASETS = list(config["datasets"])
HEALTHY_DATASET = config["healthy_dataset"]
LESION_DATASETS = [d for d in DATASETS if config["datasets"][d]["lesion"] != "none"]
SEQUENCES = config["preprocess"]["sequences"]
SYNTHETIC_DATASETS = [
    d for d in DATASETS if config["datasets"][d]["source"] == "synthetic"
]
# Every sequence some dataset is preprocessed in (each dataset carries only its own).
ALL_SEQUENCES = sorted({s for d in DATASETS for s in dataset_sequences(config, d)})
SUBJECTS_SCHEMA = os.path.join(workflow.basedir, "config", "subjects.schema.yaml")
# Study names of the configured methods (the {method} wildcard); each names its registered
# implementation with `method:` (default: the study name itself).
METHODS = list(config["methods"])
FOLDS = list(range(config["splits"]["n_folds"]))
# The evaluation mode and its grid (brainuad.evaluation.grid), and the threshold protocols
# of the main table (the headline, then one of the other kind).
EVALUATION_GRID = evaluation_grid(config)
MAIN_PROTOCOLS = main_table_protocols(config)


def implementation_of(method):
    """The registered implementation of the study's method ``method``."""
    return config["methods"][method].get("method", method)


def method_class_of(method):
    return method_class(implementation_of(method))


# Methods with trained stages (a training-free baseline has none and no training job).
TRAINED_METHODS = [m for m in METHODS if method_class_of(m).stages]
EARLIER_STAGES = sorted(
    {
        stage.name
        for method in TRAINED_METHODS
        for stage in method_class_of(method).stages
        if stage.name != FINAL_STAGE
    }
)


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    fold=r"\d+",
    split="val|test",
    subject=r"sub-[A-Za-z0-9]+",
    sequence="|".join(ALL_SEQUENCES),
    # Stages before the final one ("model"); a pattern that matches nothing when none.
    stage="|".join(EARLIER_STAGES) or "(?!)",


def runtime_per_attempt(minutes):
    """`runtime` resource of ``minutes`` × attempt: a job that ran out of time gets more on
    each retry (a rule's own value replaces the profile's default, so rules say so here).
    """

    def runtime(wildcards, attempt):
        return minutes * attempt

    return runtime


_SHEETS = {}


def sheet_of(dataset):
    """{subject: {column: path}} from the dataset's subject sheet, validated against
    config/subjects.schema.yaml; read once per version of the file.

    The checkpoint is asked only while the sheet does not exist (the first run): Snakemake
    (9.27) re-plans every job downstream of an input function that asks a checkpoint, on
    every later run, even when all is up to date. A sheet is rebuilt on purpose with
    `--forcerun subject_sheet`, after which the next run plans from the new sheet."""
    path = f"results/subjects/{dataset}.tsv"
    if not os.path.exists(path):
        path = checkpoints.subject_sheet.get(dataset=dataset).output[0]
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _SHEETS:
        table = read_sheet(path)
        validate(table, SUBJECTS_SCHEMA)
        _SHEETS[key] = {s: subject_files(table, s) for s in table["subject"]}
    return _SHEETS[key]


def subjects_of(dataset):
    """Subject identifiers of ``dataset``, from its subject sheet."""
    return sorted(sheet_of(dataset))


def subjects_of_wildcard(wildcards):
    return subjects_of(wildcards.dataset)


def is_healthy_dataset(wildcards):
    return wildcards.dataset == HEALTHY_DATASET


# ---- data and preprocessing -------------------------------------------------------------


def synthetic_lesion(wildcards):
    return config["datasets"][wildcards.dataset]["lesion"]


def dataset_spec(wildcards):
    """What the subject sheet is discovered from (only that, so that changing e.g. the
    dataset's preprocessing does not rewrite its sheet): source, folder, size, lesion,
    layout options.
    """
    spec = config["datasets"][wildcards.dataset]
    # `layout` only where set: the params of existing sheets stay as they were (no rerun).
    return {
        "source": spec["source"],
        "path": dataset_path(config, wildcards.dataset),
        "n_subjects": spec.get("n_subjects"),
        "lesion": spec["lesion"],
    } | ({"layout": spec["layout"]} if spec.get("layout") else {})


def dataset_sequences_of_wildcard(wildcards):
    return dataset_sequences(config, wildcards.dataset)


def dataset_same_grid(wildcards):
    """False where preprocessing co-registers the sequences (IXI's T1 and T2 differ)."""
    settings = dataset_preprocess(config, wildcards.dataset)
    return not settings.get("coregister_sequences", False)


def synthetic_file_pattern(wildcards):
    """Where generate_synthetic_subject writes a synthetic subject's files."""
    return f"results/standard/{wildcards.dataset}/{{subject}}/{{name}}.nii.gz"


def template_files():
    """Registration target: preprocess.template (a user's template and its brain mask),
    or MNI152 2009a from nilearn (the template_files rule)."""
    template = config["preprocess"].get("template")
    if template:
        return {
            "template_t1": template["t1"],
            "template_brainmask": template["brainmask"],
        }
    return {
        "template_t1": "results/template/mni152_t1.nii.gz",
        "template_brainmask": "results/template/mni152_brainmask.nii.gz",
    }


def standard_images(wildcards):
    """The subject's files the preprocessing reads, from the sheet: the dataset's sequences,
    and its lesion labels and true brain mask where it has them."""
    files = sheet_of(wildcards.dataset)[wildcards.subject]
    wanted = [*dataset_sequences(config, wildcards.dataset), "seg", "brainmask_truth"]
    return {name: files[name] for name in wanted if name in files}


def preprocess_inputs(wildcards):
    return {**standard_images(wildcards), **template_files()}


def slices_inputs(wildcards):
    """Preprocessed files keyed '<subject>__<name>', so the script reads paths from the DAG."""
    names = dataset_slice_sequences(config, wildcards.dataset) + ["brainmask", "seg"]
    return {
        f"{subject}__{name}": f"results/preprocessed/{wildcards.dataset}/{subject}/{name}.nii.gz"
        for subject in subjects_of(wildcards.dataset)
        for name in names
    }


def slice_sequences_of_wildcard(wildcards):
    return dataset_slice_sequences(config, wildcards.dataset)


def dataset_preprocess_of_wildcard(wildcards):
    return dataset_preprocess(config, wildcards.dataset)


def dataset_labels_of_wildcard(wildcards):
    """{'lesion': [...], 'ignore': [...]} label values of the dataset's segmentations."""
    return sheet_labels(dataset_labels(config, wildcards.dataset))


def qc_records(wildcards):
    return expand(
        "results/preprocessed/{dataset}/{subject}/qc.json",
        dataset=wildcards.dataset,
        subject=subjects_of(wildcards.dataset),
    )


def preprocess_params(wildcards):
    """Keyword arguments of brainuad.preprocess.preprocess_subject for the dataset (with the
    study seed, which seeds ANTs and deepbet)."""
    return preprocess_arguments(config, wildcards.dataset) | {"seed": config["seed"]}


def preprocess_groups():
    """(name, sequences, datasets) of each preprocessing job kind, one per set of
    sequences, since the outputs of a rule cannot depend on the dataset. Datasets in the
    study's sequences share `preprocess_subject`; others get `preprocess_subject_<seqs>`.
    """
    reference = config["preprocess"].get("reference_sequence", "t1")
    study = [reference, *(s for s in SEQUENCES if s != reference)]
    groups = {}
    for dataset in DATASETS:
        groups.setdefault(tuple(dataset_sequences(config, dataset)), []).append(dataset)
    return [
        (
            (
                "preprocess_subject"
                if list(sequences) == study
                else "preprocess_subject_" + "_".join(sequences)
            ),
            list(sequences),
            datasets,
        )
        for sequences, datasets in groups.items()
    ]


# ---- training and evaluation ------------------------------------------------------------


def stage_training_settings(method, stage):
    """The `training` block of ``method`` with the overrides of ``training.stages.<stage>``."""
    training = dict(config["methods"][method].get("training", {}))
    overrides = training.pop("stages", {})
    return training | overrides.get(stage, {})


def training_datasets(method, stage):
    """Datasets ``stage`` of ``method`` trains on, read from its declared supervision: the
    healthy cohort only for `healthy` stages (never a lesion cohort), the configured
    `train_datasets` (default: every lesion cohort) for `image_labels` stages."""
    if method_class_of(method).stage_supervision(stage) == "healthy":
        return [HEALTHY_DATASET]
    return config["methods"][method].get("train_datasets", LESION_DATASETS)


def stage_inputs(wildcards, stage=None):
    """Slices and splits of every training dataset, and the files of consumed stages."""
    stage = stage or wildcards.get("stage", FINAL_STAGE)
    inputs = {}
    for dataset in training_datasets(wildcards.method, stage):
        inputs[f"slices__{dataset}"] = f"results/slices/{dataset}.h5"
        inputs[f"splits__{dataset}"] = f"results/splits/{dataset}.csv"
    for earlier in method_class_of(wildcards.method).stage(stage).consumes:
        inputs[f"stage__{earlier}"] = (
            f"results/models/{wildcards.method}/fold{wildcards.fold}/{earlier}.pt"
        )
    return inputs


def final_stage_inputs(wildcards):
    return stage_inputs(wildcards, FINAL_STAGE)


def stage_config(wildcards, stage=None):
    """What determines the training of one stage (a param: changing it reruns the stage and,
    through its file, the stages after it; scoring and post-processing settings are not in
    it): the implementation, `model`, the stage's `training`, `inputs`, `size` and the
    training datasets with which of them is the healthy training cohort."""
    stage = stage or wildcards.get("stage", FINAL_STAGE)
    method = config["methods"][wildcards.method]
    return {
        "implementation": implementation_of(wildcards.method),
        "model": method.get("model", {}),
        "training": stage_training_settings(wildcards.method, stage),
        "inputs": method.get("inputs"),
        "size": method.get("size"),
        "datasets": {
            dataset: dataset == HEALTHY_DATASET
            for dataset in training_datasets(wildcards.method, stage)
        },
    }


def final_stage_config(wildcards):
    return stage_config(wildcards, FINAL_STAGE)


def score_inputs(wildcards):
    """The trained model (none for a training-free method), the slices and the splits."""
    inputs = {
        "slices": f"results/slices/{wildcards.dataset}.h5",
        "splits": f"results/splits/{wildcards.dataset}.csv",
    }
    if method_class_of(wildcards.method).stages:
        inputs["model"] = (
            f"results/models/{wildcards.method}/fold{wildcards.fold}/model.pt"
        )
    return inputs


def score_config(wildcards):
    """How scoring reads the slices (`inputs`, `size`) and, for a training-free method, how
    to build it (its implementation and `model` block)."""
    method = config["methods"][wildcards.method]
    record = {"inputs": method.get("inputs"), "size": method.get("size")}
    if not method_class_of(wildcards.method).stages:
        record["build"] = {
            "implementation": implementation_of(wildcards.method),
            "model": method.get("model", {}),
        }
    return record


def postprocess_by_method():
    """evaluation.postprocess, overridden key by key by methods.<method>.postprocess."""
    return {
        method: {
            **config["evaluation"].get("postprocess", {}),
            **config["methods"][method].get("postprocess", {}),
        }
        for method in METHODS
    }


def postprocess_config(wildcards):
    return postprocess_by_method()[wildcards.method]


def score_batch_size(wildcards):
    return config["methods"][wildcards.method].get("score_batch_size", 32)


def calibration_inputs(wildcards):
    """Validation data only: the fold's healthy val scores, and each lesion cohort's val
    scores when the best-Dice-on-validation protocol is on. Never a test split."""
    prefix = f"results/scores/{wildcards.method}/fold{wildcards.fold}"
    inputs = {
        "healthy_val_scores": f"{prefix}/{HEALTHY_DATASET}_val.h5",
        "healthy_val_slices": f"results/slices/{HEALTHY_DATASET}.h5",
    }
    for dataset in calibration_lesion_datasets(wildcards):
        inputs[f"lesion_val_scores__{dataset}"] = f"{prefix}/{dataset}_val.h5"
        inputs[f"lesion_val_slices__{dataset}"] = f"results/slices/{dataset}.h5"
    return inputs


def calibration_lesion_datasets(wildcards):
    """The lesion cohorts calibrate_threshold calibrates on by best Dice on validation (their
    val scores are its inputs); none when evaluation.best_dice_on_validation is off."""
    if config["evaluation"]["best_dice_on_validation"]:
        scored = scored_datasets(config, wildcards.method)
        return [dataset for dataset in LESION_DATASETS if dataset in scored]
    return []


def selection_datasets(wildcards):
    """The lesion cohorts an `anofpdm` method trained on: their val subjects (slice labels
    only) choose its constants (brainuad.methods.anofpdm.select_constants)."""
    return [
        dataset
        for dataset in training_datasets(wildcards.method, FINAL_STAGE)
        if dataset != HEALTHY_DATASET
    ]


def selection_inputs(wildcards):
    """The trained model, and slices and splits of each of its selection_datasets."""
    inputs = {
        "model": f"results/models/{wildcards.method}/fold{wildcards.fold}/model.pt"
    }
    for dataset in selection_datasets(wildcards):
        inputs[f"slices__{dataset}"] = f"results/slices/{dataset}.h5"
        inputs[f"splits__{dataset}"] = f"results/splits/{dataset}.csv"
    return inputs


def selection_files():
    """selection.json of every method implemented by `anofpdm`, every fold."""
    return expand(
        "results/calibration/{method}/fold{fold}/selection.json",
        method=[m for m in METHODS if implementation_of(m) == "anofpdm"],
        fold=FOLDS,
    )


def feature_weights(wildcards):
    """evaluation.lpips_weights / inception_weights as inputs of subject_metrics when set,
    so that a missing or replaced weights file is seen when the DAG is built."""
    weights = {}
    for key in ("lpips_weights", "inception_weights"):
        path = config["evaluation"].get(key)
        if path is None:
            continue
        if not os.path.exists(path):
            raise ValueError(
                f"evaluation.{key}: {path} does not exist; expected a .pt2 or "
                "TorchScript network file, or null to skip the metric"
            )
        weights[key] = path
    return weights


# (method, fold, dataset) of every evaluation: each method on the datasets that hold the
# sequences it reads (brainuad.data.datasets.scored_datasets), every fold.
METRIC_KEYS = [
    (method, fold, dataset)
    for method in METHODS
    for fold in FOLDS
    for dataset in scored_datasets(config, method)
]


# Metric columns of the significance tables (evaluation.significance.metrics, or Dice at
# the default protocol and AUPRC); checked here, so a bad name fails the dry run.
SIGNIFICANCE_METRICS = significance_metrics(
    config["evaluation"]["significance"],
    config["evaluation"]["default_protocol"],
    calibration_protocols(config),
)


def metrics_files():
    return [
        f"results/metrics/{method}/fold{fold}/{dataset}.csv"
        for method, fold, dataset in METRIC_KEYS
    ]


def metrics_summaries():
    return [path.removesuffix(".csv") + ".json" for path in metrics_files()]


def test_scores_files():
    return [
        f"results/scores/{method}/fold{fold}/{dataset}_test.h5"
        for method, fold, dataset in METRIC_KEYS
    ]


def training_logs():
    return expand(
        "results/models/{method}/fold{fold}/train_log.csv",
        method=TRAINED_METHODS,
        fold=FOLDS,
    )


# ---- targets ---------------------------------------------------------------------------

FIGURES = ["dice_boxplot", "pr_curves", "qualitative", "training_curves"]


def figure_outputs():
    """Named figure outputs (PNG in the report, PDF for papers)."""
    outputs = {}
    for name in FIGURES:
        outputs[f"{name}_png"] = report(
            f"results/figures/{name}.png",
            caption=f"../report/captions/{name}.rst",
            category="Figures",
            labels={"figure": name},
        )
        outputs[f"{name}_pdf"] = f"results/figures/{name}.pdf"
    return outputs


def data_targets():
    return (
        expand("results/slices/{dataset}.h5", dataset=DATASETS)
        + expand("results/splits/{dataset}.csv", dataset=DATASETS)
        + expand("results/qc/{dataset}.csv", dataset=DATASETS)
    )


def all_targets():
    return (
        data_targets()
        + selection_files()
        + [
            "results/tables/main.md",
            "results/tables/significance.md",
            *(f"results/figures/{name}.png" for name in FIGURES),
            "results/figures/significance.png",
        ]
    )
