"""Registry of sources: type name -> class, discovered from the modules of this package (a new
source is one file defining a ``Source`` subclass with a ``name``)."""
from __future__ import annotations

from data_prep.registry import discover
from data_prep.sources.base import Rejected, Sample, Source, SourceConfig, SourceError

SOURCES: dict[str, type[Source]] = discover(__name__, __path__, Source)


def make_source(kind: str, cfg: SourceConfig, label: str | None = None) -> Source:
    """Open a source of type ``kind``; ``label`` is its config entry's name (default: ``kind``)."""
    return SOURCES[kind](cfg, label)


__all__ = ["SOURCES", "Rejected", "Sample", "Source", "SourceConfig", "SourceError", "make_source"]
