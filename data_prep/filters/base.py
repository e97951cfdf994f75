"""The stage protocol: measure samples, then judge the measures, per sample or over the whole dataset.

Keeping measuring and judging apart means every measured value is recorded (decisions.parquet, the
shard json) whatever the verdict, and thresholds can be studied later without re-measuring.

Two kinds of stage share this protocol:

- per-sample stages judge each sample alone (``reject_reason``), in the worker that measured it;
- global stages (``is_global``: corpus frequency, duplicates, CLIP top-k%) only *measure* in the
  workers (a caption key, a hash, a score); the merge then judges every sample at once
  (``global_reasons``) over the samples that survived the stages configured before it.

Stages run in config order and the first rejection wins. A stage that needs the image
(``needs_image``) makes the worker fetch it first, so text stages placed before image stages
save downloads and decodes. A stage may rewrite ``sample.caption`` in ``measure`` (clean-up);
later stages and the shard see the rewritten text.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa

from data_prep.sources.base import Sample

Measures = dict[str, Any]  # name -> int | float | str | bool (types in ``measure_types``)


class Reject(Exception):
    """Raised by ``measure`` when a sample cannot be measured at all (undecodable image, non-UTF-8
    caption); its message ``"code: detail"`` is the recorded reason. The builder records it and moves on."""


class Filter(abc.ABC):
    name: ClassVar[str]  # registry key, config key under ``filters``, recorded in decisions
    Config: ClassVar[type]  # dataclass of thresholds; ``__post_init__`` validates them
    measure_types: ClassVar[dict[str, type]]  # names and types of what ``measure`` returns (parquet columns)
    needs_image: ClassVar[bool] = False  # True: ``sample.image`` must be fetched before ``measure``

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @property
    def is_global(self) -> bool:
        """True when the verdict needs the whole dataset (judged by ``global_reasons`` in the merge)."""
        return False

    @abc.abstractmethod
    def measure(self, sample: Sample) -> Measures:
        """Values describing the sample (keys of ``measure_types``); raise ``Reject`` if it has none."""

    def measure_batch(self, samples: Sequence[Sample]) -> list[Measures | Reject]:
        """``measure`` of each sample; stages that batch (a model forward) override this."""
        out: list[Measures | Reject] = []
        for s in samples:
            try:
                out.append(self.measure(s))
            except Reject as e:
                out.append(e)
        return out

    def reject_reason(self, measures: Measures) -> str | None:
        """Per-sample stages: ``"code: detail"`` when the sample fails this stage's thresholds, else None."""
        return None

    def global_reasons(self, table: pa.Table, alive: np.ndarray) -> list[str | None]:
        """Global stages: a reason (or None) for each row of ``table``.

        ``table`` holds every input sample in build order (deterministic: plan order, then input
        order within a unit) with the columns ``uid``, ``source`` and this stage's measures (null
        where it was not measured); ``alive`` (bool, one per row) marks the samples that survived
        every earlier stage: only they count and only they may be rejected."""
        raise NotImplementedError(f"filter {self.name} is global but does not implement global_reasons")

    def close(self) -> None:
        """Release what the stage holds (models, pools)."""


@dataclass
class Verdict:
    measures: Measures = field(default_factory=dict)
    filter: str | None = None  # the first filter that rejected the sample
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None


def judge(stage: Filter, samples: Sequence[Sample]) -> list[tuple[Measures, str | None]]:
    """``(measures, reason)`` of ``stage`` for each sample: ``measure_batch`` then, for per-sample
    stages, ``reject_reason`` (global stages only measure here). A sample that cannot be measured
    gets no measures and its ``Reject`` message as the reason."""
    out: list[tuple[Measures, str | None]] = []
    for result in stage.measure_batch(samples):
        if isinstance(result, Reject):
            out.append(({}, str(result)))
        else:
            out.append((result, None if stage.is_global else stage.reject_reason(result)))
    return out


def apply_filters(filters: Sequence[Filter], sample: Sample) -> Verdict:
    """Run ``filters`` on one sample in order; the first rejection wins and later filters are not
    run (they may be expensive, and may not even be able to measure what an earlier one rejected).
    Used by tests and tools; the worker applies the same ``judge`` batch-wise."""
    verdict = Verdict()
    for f in filters:
        (measures, reason), = judge(f, [sample])
        verdict.measures.update(measures)
        if reason is not None:
            return Verdict(verdict.measures, f.name, reason)
    return verdict
