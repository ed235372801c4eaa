"""Micro-benchmarks whose numbers are recorded in docs/benchmarks.md (``python -m ...``)."""
