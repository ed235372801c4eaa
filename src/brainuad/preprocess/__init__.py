"""Per-subject preprocessing of brain MRI: reorient, resample, N4, skull-strip, register to
MNI152, normalise, crop, QC. One module per step; :func:`preprocess_subject` runs them all."""

from brainuad.preprocess.pipeline import preprocess_subject

__all__ = ["preprocess_subject"]
