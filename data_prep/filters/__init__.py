"""Registry of filter stages: config key -> class, discovered from the modules of this package.

A new stage is one file here defining a ``Filter`` subclass with a ``name``; it is found
automatically. The order under ``filters:`` in the config (``conf/filters/*.yaml``) is the order
stages run in.
"""
from __future__ import annotations

from data_prep.filters.base import Filter, Measures, Reject, Verdict, apply_filters
from data_prep.registry import discover

FILTERS: dict[str, type[Filter]] = discover(__name__, __path__, Filter)


def make_filter(name: str, cfg) -> Filter:
    return FILTERS[name](cfg)


__all__ = ["FILTERS", "Filter", "Measures", "Reject", "Verdict", "apply_filters", "make_filter"]
