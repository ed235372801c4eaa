"""The method registry: every anomaly-detection method is registered once, by name.

A method file declares itself with ``@register("name")``; the workflow builds it from the
config with ``build_method(name, **hparams)``. Hyperparameters are the keyword-only arguments
of the class constructor, so the constructor signature is the single source of truth for
which hyperparameters exist and what their defaults are.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from brainuad.errors import InputError

if TYPE_CHECKING:
    from brainuad.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~brainuad.methods.base.Method` under ``name``.

    Raises:
        ValueError: if ``name`` is already taken (two methods must never share a name, since
            the name is a wildcard in every output path), or if ``scoring_hparams`` names a
            keyword the constructor does not have.
    """

    def decorator(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(
                f"method name {name!r} is already registered by "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}"
            )
        unknown = sorted(set(cls.scoring_hparams) - set(_constructor_keywords(cls)))
        if unknown:
            raise ValueError(
                f"method {name!r}: scoring_hparams {unknown} are not keyword arguments of "
                f"{cls.__qualname__}.__init__"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (InputError listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"method {name!r} is not registered; available methods: {available_methods()}"
        ) from None


def _constructor_keywords(cls: type[Method]) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def default_hparams(name: str) -> dict[str, Any]:
    """Hyperparameter names and defaults of method ``name`` (its constructor's keywords)."""
    return _constructor_keywords(method_class(name))


def build_method(name: str, **hparams: Any) -> Method:
    """Build method ``name`` with the given hyperparameters (the others keep their defaults).

    Raises:
        InputError: naming the method and the offending hyperparameter if a name is unknown
            (listing the valid ones) or a value is rejected by the method.
    """
    cls = method_class(name)
    valid = default_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise InputError(
            f"method {name!r}: unknown hyperparameter(s) {unknown}; valid: {sorted(valid)}"
        )
    try:
        return cls(**hparams)
    except InputError as error:
        message = str(error)
        if not message.startswith(f"method {name!r}"):
            message = f"method {name!r}: {message}"
        raise InputError(message) from error
    except (ValueError, TypeError, AssertionError) as error:
        # MONAI validates network arguments with ValueError/AssertionError; surface them as
        # configuration errors, with the hyperparameters that were given.
        raise InputError(f"method {name!r}: invalid hyperparameters {hparams}: {error}") from error


def import_method_modules(modules: Iterable[str]) -> None:
    r"""Import modules that register methods of their own (the config's ``method_modules``).

    A study can benchmark a method kept outside this package: a module on ``PYTHONPATH``
    that defines and ``@register``\ s it. Importing twice is a no-op.

    Raises:
        InputError: naming the module when it cannot be imported.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise InputError(
                f"method_modules: cannot import {module!r} ({error}); it must be importable "
                "(on PYTHONPATH) by Snakemake and by every job"
            ) from error
