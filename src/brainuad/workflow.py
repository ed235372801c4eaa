"""Glue for the thin Snakemake scripts: logging into the rule's log file, thread limits."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def rule_logging(log_path: str | os.PathLike, threads: int = 1) -> Iterator[logging.Logger]:
    """Send stdout, stderr and Python logging of a rule's script to ``log_path``.

    Also caps the threads of NumPy/ITK/PyTorch/numba at the rule's ``threads``, so parallel
    jobs do not oversubscribe the cores. Exceptions are written to the log, then re-raised.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(threads)
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)
    # Simplex noise (opensimplex) runs numba-parallel loops; their worker threads, one per
    # core by default, spin after each call and took the cores from the other jobs (a CPU
    # DDPM step with simplex noise was 4x slower than with Gaussian noise). Once numba is
    # imported its NUMBA_NUM_THREADS must not change (numba re-reads the environment and
    # refuses), so the cap is then set through set_num_threads only.
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log_file:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = log_file
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield logging.getLogger("brainuad")
        except BaseException:
            traceback.print_exc(file=log_file)
            raise
        finally:
            root.removeHandler(handler)
            sys.stdout, sys.stderr = old_out, old_err
