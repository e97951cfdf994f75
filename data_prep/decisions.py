"""``decisions.parquet``: the fate of every input sample, and the funnel summarising it.

One row per input: ``uid``, ``source``, ``source_id``, ``url``, ``caption`` (as the shard has it,
after any clean-up stage), ``split`` (null when rejected),
``kept``, ``filter`` (the first rejecting stage: a filter name, ``source`` when the source could
not use the item, ``download`` when fetching failed, ``write`` when re-encoding failed),
``reason`` (``"code: detail"``), ``retryable`` (a transient download failure that
``retry_failed=true`` fetches again) and one nullable column per measured value. Nothing is
dropped silently: whatever is not in the shards is here with its reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

DECISIONS_NAME = "decisions.parquet"
SOURCE_STAGE = "source"  # ``filter`` of items their source rejected (e.g. no_caption)
DOWNLOAD_STAGE = "download"  # ``filter`` of samples whose image could not be fetched
WRITE_STAGE = "write"  # ``filter`` of samples whose image could not be re-encoded for the shard
BASE_SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("url", pa.string()),
    ("caption", pa.string()), ("split", pa.string()), ("kept", pa.bool_()), ("filter", pa.string()), ("reason", pa.string()),
    ("retryable", pa.bool_()),
])
BASE_COLUMNS = tuple(BASE_SCHEMA.names)
_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def schema(measure_types: dict[str, type], extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """Base columns, then ``extra`` (internal bookkeeping), then one column per measure."""
    return pa.schema([*BASE_SCHEMA, *extra, *(pa.field(n, _ARROW_TYPES[t]) for n, t in measure_types.items())])


def rows_table(rows: Sequence[dict[str, Any]], table_schema: pa.Schema) -> pa.Table:
    """Rows (dicts; missing keys are null) as a table with a fixed schema, so empty or all-null
    columns keep their type and tables of different units concatenate."""
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in table_schema},
                    schema=table_schema)


@dataclass
class FunnelRow:
    source: str
    inputs: int = 0
    rejected: Counter = field(default_factory=Counter)  # stage -> count
    kept: Counter = field(default_factory=Counter)  # split -> count


def funnel(table: pa.Table) -> list[FunnelRow]:
    """Per source (in first-seen order) then a ``total`` row; grouped in Arrow, not per row in Python."""
    grouped = table.group_by(["source", "kept", "filter", "split"], use_threads=False).aggregate([("uid", "count")])
    order = {s: i for i, s in enumerate(pc.unique(table["source"]).to_pylist())}
    rows: dict[str, FunnelRow] = {s: FunnelRow(s) for s in order}
    total = FunnelRow("total")
    for g in grouped.to_pylist():
        for row in (rows[g["source"]], total):
            row.inputs += g["uid_count"]
            if g["kept"]:
                row.kept[g["split"]] += g["uid_count"]
            else:
                row.rejected[g["filter"]] += g["uid_count"]
    return [*rows.values(), total]


def reason_counts(table: pa.Table) -> Counter:
    """(source, filter, reason code) -> count; the code is the reason up to its first colon."""
    rejected = table.filter(pc.invert(table["kept"]))
    codes = pc.list_element(pc.split_pattern(rejected["reason"], ":", max_splits=1), 0)
    t = pa.table({"source": rejected["source"], "filter": rejected["filter"], "code": codes})
    grouped = t.group_by(["source", "filter", "code"], use_threads=False).aggregate([("code", "count")])
    return Counter({(g["source"], g["filter"], g["code"]): g["code_count"] for g in grouped.to_pylist()})


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
    used = [s for s in stages if any(r.rejected[s] for r in rows) or s not in (SOURCE_STAGE, DOWNLOAD_STAGE, WRITE_STAGE)]
    header = ["source", "input", *(f"-{s}" for s in used), *(f"kept {s}" for s in splits)]
    body = [[r.source, r.inputs, *(r.rejected[s] for s in used), *(r.kept[s] for s in splits)] for r in rows]
    return _markdown(header, body)


def render_reasons(counts: Counter) -> str:
    body = [[src, flt, code, n] for (src, flt, code), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _markdown(["source", "filter", "reason", "count"], body)
