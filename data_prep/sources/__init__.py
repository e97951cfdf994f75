"""Registry of sources: config key -> class. A new source is one file plus one line here."""
from __future__ import annotations

from data_prep.sources.base import Rejected, Sample, Source, SourceConfig, SourceError
from data_prep.sources.fashion_mnist import FashionMnist
from data_prep.sources.tuxpaint import TuxPaint

SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (
    FashionMnist,
    TuxPaint,
)}


def make_source(name: str, cfg: SourceConfig) -> Source:
    return SOURCES[name](cfg)


__all__ = ["SOURCES", "Rejected", "Sample", "Source", "SourceConfig", "SourceError", "make_source"]
