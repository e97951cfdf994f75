"""The filter protocol: measure a sample, then judge the measures.

Keeping measuring and judging apart means every measured value is recorded (decisions.parquet, the
shard json) whatever the verdict, and thresholds can be studied later without re-measuring.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from data_prep.sources.base import Sample

Measures = dict[str, "float | int"]


class Reject(Exception):
    """Raised by ``measure`` when a sample cannot be measured at all (undecodable image, non-UTF-8
    caption); its message is the recorded reason. The builder records it and moves on."""


class Filter(abc.ABC):
    name: ClassVar[str]  # registry key, config key under ``filters``, recorded in decisions
    Config: ClassVar[type]  # dataclass of thresholds; ``__post_init__`` validates them
    measure_types: ClassVar[dict[str, type]]  # names and types of what ``measure`` returns (parquet columns)

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def measure(self, sample: Sample) -> Measures:
        """Values describing the sample (keys of ``measure_types``); raise ``Reject`` if it has none."""

    @abc.abstractmethod
    def reject_reason(self, measures: Measures) -> str | None:
        """``"code: detail"`` when the sample fails this filter's thresholds, else None."""


@dataclass
class Verdict:
    measures: Measures = field(default_factory=dict)
    filter: str | None = None  # the first filter that rejected the sample
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None


def apply_filters(filters: Sequence[Filter], sample: Sample) -> Verdict:
    """Run ``filters`` in order; the first rejection wins and later filters are not run (they may be
    expensive, and may not even be able to measure what an earlier one rejected)."""
    verdict = Verdict()
    for f in filters:
        try:
            measures = f.measure(sample)
        except Reject as e:
            return Verdict(verdict.measures, f.name, str(e))
        verdict.measures.update(measures)
        reason = f.reject_reason(measures)
        if reason is not None:
            return Verdict(verdict.measures, f.name, reason)
    return verdict
