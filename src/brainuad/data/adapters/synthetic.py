"""The embedded synthetic cohort as a "download": its subjects are ``sub-000`` ...

The files do not exist when the sheet is written: they are outputs of the workflow's
generation rule, whose path pattern the caller gives, so the synthetic cohort goes through
the same sheet and the same input functions as a real dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

from brainuad.config import synthetic_subjects
from brainuad.data.adapters.base import Discovery, LabelConvention, SubjectRecord
from brainuad.errors import InputError

# Labels of brainuad.data.synthetic (tumour: 1 necrosis, 2 oedema, 3 enhancing).
LABELS = LabelConvention(lesion=(1, 2, 3), description="synthetic cohort")


def discover(
    n_subjects: int, sequences: Sequence[str], file_pattern: str, lesion: str
) -> Discovery:
    """Sheet rows of a synthetic dataset.

    Args:
        n_subjects: cohort size.
        sequences: the generated sequences.
        file_pattern: path of one generated file with ``{subject}`` and ``{name}`` fields
            (from the workflow: ``results/standard/<dataset>/{subject}/{name}.nii.gz``).
        lesion: the cohort's lesion kind; ``none`` has no seg column.
    """
    if "{subject}" not in file_pattern or "{name}" not in file_pattern:
        raise InputError(f"file_pattern: '{file_pattern}' needs {{subject}} and {{name}} fields")
    names = [*sequences, "brainmask_truth"] + ([] if lesion == "none" else ["seg"])
    records = [
        SubjectRecord(
            subject=subject,
            source_id=subject,
            files={name: file_pattern.format(subject=subject, name=name) for name in names},
            site="synthetic",
        )
        for subject in synthetic_subjects(n_subjects)
    ]
    return Discovery(records=records)
