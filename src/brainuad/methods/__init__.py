"""Anomaly-detection methods, one file per method, registered by name.

Importing this package registers every built-in method::

    from brainuad.methods import build_method
    method = build_method("ddpm", channels=(32, 64, 64))
"""

from brainuad.methods import (  # noqa: F401  (registers them)
    ae,
    anoddpm,
    anofpdm,
    autoddpm,
    cddpm,
    dae,
    ddib,
    ddpm,
    intensity,
    pddpm,
    vae,
    wolleb,
)
from brainuad.methods.base import Method, ScoreOutput
from brainuad.methods.registry import (
    available_methods,
    build_method,
    default_hparams,
    import_method_modules,
    method_class,
    register,
)

__all__ = [
    "Method",
    "ScoreOutput",
    "available_methods",
    "build_method",
    "default_hparams",
    "import_method_modules",
    "method_class",
    "register",
]
