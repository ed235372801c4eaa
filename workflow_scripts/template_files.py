"""Write the MNI152 template T1 and brain mask that every subject is registered to."""

from brainuad.data.template import write_template_files
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]):
    write_template_files(snakemake.output.t1, snakemake.output.brainmask)
