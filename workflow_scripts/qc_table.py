"""Collect the per-subject QC records of one dataset into a table."""

import pandas as pd

from brainuad.io.atomic import atomic_path
from brainuad.io.readers import read_json
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]):
    records = [read_json(path, "preprocessing QC record (JSON)") for path in snakemake.input]
    table = pd.json_normalize(records)
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
