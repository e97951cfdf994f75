"""``decisions.parquet``: the fate of every input sample, and the funnel summarising it.

One row per input: ``uid``, ``source``, ``source_id``, ``split`` (null when rejected), ``kept``,
``filter`` (the first rejecting filter, ``source`` when the source itself could not use the item),
``reason`` (``"code: detail"``) and one nullable column per measured value. Nothing is dropped
silently: whatever is not in the shards is here with its reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.atomic import atomic_write
from data_prep.filters.base import Measures

DECISIONS_NAME = "decisions.parquet"
SOURCE_STAGE = "source"  # ``filter`` value of items their source rejected (e.g. no_caption)
BASE_COLUMNS = ("uid", "source", "source_id", "split", "kept", "filter", "reason")
_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


@dataclass
class Decision:
    uid: str
    source: str
    source_id: str
    split: str | None
    filter: str | None = None
    reason: str | None = None
    measures: Measures = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.reason is None


def decisions_table(decisions: Sequence[Decision], measure_types: dict[str, type]) -> pa.Table:
    """Columns in a fixed order with fixed types, so empty or all-null columns keep their schema."""
    columns = {
        "uid": pa.array([d.uid for d in decisions], pa.string()),
        "source": pa.array([d.source for d in decisions], pa.string()),
        "source_id": pa.array([d.source_id for d in decisions], pa.string()),
        "split": pa.array([d.split for d in decisions], pa.string()),
        "kept": pa.array([d.kept for d in decisions], pa.bool_()),
        "filter": pa.array([d.filter for d in decisions], pa.string()),
        "reason": pa.array([d.reason for d in decisions], pa.string()),
    }
    for name, typ in measure_types.items():
        columns[name] = pa.array([d.measures.get(name) for d in decisions], _ARROW_TYPES[typ])
    return pa.table(columns)


def write_decisions(decisions: Sequence[Decision], measure_types: dict[str, type], path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as f:
        pq.write_table(decisions_table(decisions, measure_types), f)
    return path


@dataclass
class FunnelRow:
    source: str
    inputs: int = 0
    rejected: Counter = field(default_factory=Counter)  # stage (filter name or "source") -> count
    kept: Counter = field(default_factory=Counter)  # split -> count


def funnel(decisions: Sequence[Decision]) -> list[FunnelRow]:
    """Per source (in first-seen order) then a ``total`` row."""
    rows: dict[str, FunnelRow] = {}
    total = FunnelRow("total")
    for d in decisions:
        for row in (rows.setdefault(d.source, FunnelRow(d.source)), total):
            row.inputs += 1
            if d.kept:
                row.kept[d.split] += 1
            else:
                row.rejected[d.filter] += 1
    return [*rows.values(), total]


def reason_counts(decisions: Sequence[Decision]) -> Counter:
    """(source, filter, reason code) -> count; the code is the reason up to its first colon."""
    return Counter((d.source, d.filter, d.reason.split(":", 1)[0]) for d in decisions if not d.kept)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(isinstance(r[i], int) for r in rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:  # numbers right-aligned, text left-aligned
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if n else "-") for w, n in zip(widths, numeric)) + "|"
    return "\n".join([fmt(cells[0]), rule, *map(fmt, cells[1:])])


def render_funnel(rows: Sequence[FunnelRow], stages: Sequence[str], splits: Sequence[str]) -> str:
    """Markdown table: source | input | rejected by each stage, in run order | kept per split."""
    header = ["source", "input", *(f"-{s}" for s in stages), *(f"kept {s}" for s in splits)]
    body = [[r.source, r.inputs, *(r.rejected[s] for s in stages), *(r.kept[s] for s in splits)] for r in rows]
    return _markdown(header, body)


def render_reasons(counts: Counter) -> str:
    body = [[src, flt, code, n] for (src, flt, code), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _markdown(["source", "filter", "reason", "count"], body)
