"""Registry of filters: config key -> class. A new filter is one file, one line here and one entry
under ``filters:`` in ``conf/prep.yaml`` (the order there is the order they run in)."""
from __future__ import annotations

from data_prep.filters.base import Filter, Measures, Reject, Verdict, apply_filters
from data_prep.filters.caption_length import CaptionLengthFilter
from data_prep.filters.image_size import ImageSizeFilter

FILTERS: dict[str, type[Filter]] = {cls.name: cls for cls in (
    ImageSizeFilter,
    CaptionLengthFilter,
)}


def make_filter(name: str, cfg) -> Filter:
    return FILTERS[name](cfg)


__all__ = ["FILTERS", "Filter", "Measures", "Reject", "Verdict", "apply_filters", "make_filter"]

