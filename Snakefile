# brainuad: the whole study, from raw (or synthetic) scans to tables, figures and report.
# Logic lives in src/brainuad; rules are thin and call workflow_scripts/.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# Make the package importable by the rules and by every job, including jobs in the conda
# environments of envs/ and jobs on cluster nodes, without relying on an installed copy.
SOURCE_DIR = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SOURCE_DIR)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SOURCE_DIR, os.getenv("PYTHONPATH")]))
)


# The default study, unless the command line gives config files (e.g. config/tiny.yaml),
# which then replace it rather than being merged into it; --config KEY=VALUE still applies.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/common_synthetic.smk"
include: "rules/subjects.smk"
include: "rules/data.smk"
include: "rules/synthetic.smk"
include: "rules/preprocess.smk"
include: "rules/slices.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        lesion_volume_qc_targets(),
