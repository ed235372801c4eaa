"""Dataset adapters: one module per download layout, registered by ``source`` name.

See :mod:`brainuad.data.adapters.base` for what an adapter provides and
``docs/datasets.md`` for the layouts.
"""

from __future__ import annotations

from brainuad.data.adapters import atlas2, bids, brats2021, cddpm_release, ixi, mslub, wmh2017
from brainuad.data.adapters.base import Adapter, LabelConvention
from brainuad.errors import InputError

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        ixi.ADAPTER,
        brats2021.ADAPTER,
        atlas2.ADAPTER,
        wmh2017.ADAPTER,
        mslub.ADAPTER,
        cddpm_release.ADAPTER,
        bids.ADAPTER,
    )
}
SOURCES: tuple[str, ...] = ("synthetic", *ADAPTERS)


def get_adapter(source: str) -> Adapter:
    """The adapter of a ``source`` name (not ``synthetic``, which has no download)."""
    if source not in ADAPTERS:
        raise InputError(f"source: '{source}' is not one of {sorted(ADAPTERS)}")
    return ADAPTERS[source]


__all__ = ["ADAPTERS", "SOURCES", "Adapter", "LabelConvention", "get_adapter"]
