"""Collect the per-subject QC records of one dataset into a table."""

import json
from pathlib import Path

import pandas as pd

from brainuad.io.atomic import atomic_path
from brainuad.workflow import rule_logging

with rule_logging(snakemake.log[0]):
    records = [json.loads(Path(path).read_text()) for path in snakemake.input]
    table = pd.json_normalize(records)
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
