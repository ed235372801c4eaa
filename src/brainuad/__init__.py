"""brainuad: a reproducible benchmark of unsupervised anomaly detection in brain MRI."""

__version__ = "0.1.0"
