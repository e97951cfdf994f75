"""One unit of work: read a unit's items, run the stages batch by batch, write the unit's results.

For each unit ``<out_dir>/.work/units/<NNNNNN>/`` receives ``samples.tar`` (the samples that no
per-sample stage rejected, already re-encoded for the shards, in input order), ``decisions.parquet``
(one row per input item) and, last, ``DONE``. A unit without ``DONE`` is redone from scratch by the
next run, so killing a build at any moment loses at most the units in flight. Everything here is
deterministic (input order, no timing), which is why a resumed build's shards are byte-identical to
an uninterrupted one's.

Stages run in config order over a batch; the first stage that needs the image triggers the
download of the batch's surviving samples (so text stages placed first save downloads); global
stages only measure here and are judged later by the merge.
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import PrepError, images
from data_prep.atomic import atomic_write
from data_prep.split import assign_split
from data_prep.config import PrepConfig
from data_prep.decisions import BASE_COLUMNS, DOWNLOAD_STAGE, SOURCE_STAGE, WRITE_STAGE, rows_table, schema
from data_prep.download import Downloader
from data_prep.filters import Filter, Reject, make_filter
from data_prep.filters.base import judge
from data_prep.plan import Unit, work_dir
from data_prep.filters.image_size import ImageSizeFilter
from data_prep.resize import decode_need, encode_for_shard
from data_prep.shards import KeptSample, TarAppender, record_bytes, tar_record
from data_prep.sources import Rejected, Sample, Source, make_source
from data_prep.sources.base import DECODE_ERRORS

UNITS_DIR = "units"
DONE_NAME = "DONE"
SAMPLES_NAME = "samples.tar"
UNIT_DECISIONS = "decisions.parquet"
# Internal columns of a unit's decisions: the item's position in its unit (output order) and the
# position in the stage order where it was rejected (the merge needs it to rank global verdicts).
# ``tar_offset``/``tar_size``: where a kept sample's members lie in the unit's tar (the merge copies
# that byte range into a shard).
POS_FIELDS = (pa.field("pos", pa.int64()), pa.field("stage_pos", pa.float64()),
              pa.field("tar_offset", pa.int64()), pa.field("tar_size", pa.int64()))
INTERNAL_COLUMNS = tuple(f.name for f in POS_FIELDS)


def measure_columns(filters: Sequence[Filter]) -> dict[str, type]:
    """All stages' measure names -> types; two stages may not record under the same name."""
    types: dict[str, type] = {}
    for f in filters:
        for name, typ in f.measure_types.items():
            if name in types or name in BASE_COLUMNS or name in INTERNAL_COLUMNS:
                raise PrepError(f"filter {f.name!r} measures {name!r}, a name already used; rename one of them")
            types[name] = typ
    return types


@dataclass
class Context:
    """What a worker process builds once and reuses for every unit it is given."""

    cfg: PrepConfig
    sources: dict[str, Source]
    stages: list[Filter]
    downloader: Downloader
    table_schema: pa.Schema
    progress: Callable[[int], None] = field(default=lambda n: None)

    @classmethod
    def create(cls, cfg: PrepConfig) -> "Context":
        sources = open_sources(cfg)
        stages = [make_filter(name, options) for name, options in cfg.filters.items()]
        need = decode_need(cfg.resize)
        for stage in stages:  # the first decode, reused by later stages, may be reduced for the resize
            if isinstance(stage, ImageSizeFilter):
                stage.decode_need = need
        return cls(cfg, sources, stages, Downloader(cfg.download), schema(measure_columns(stages), POS_FIELDS))

    def close(self) -> None:
        self.downloader.close()
        for s in self.stages:
            s.close()


def open_sources(cfg: PrepConfig) -> dict[str, Source]:
    """Every configured source, opened (a missing root fails here, before any work)."""
    return {label: make_source(options.type or label, options, label) for label, options in cfg.sources.items()}


def unit_dir(cfg: PrepConfig, unit: Unit) -> Path:
    return work_dir(cfg) / UNITS_DIR / unit.name


def is_done(cfg: PrepConfig, unit: Unit) -> bool:
    return (unit_dir(cfg, unit) / DONE_NAME).exists()


def _text(caption: str | None) -> str | None:
    """A caption as parquet can store it: undecodable bytes (lone surrogates) shown as U+FFFD."""
    if caption is None:
        return None
    return caption.encode("utf-8", errors="replace").decode("utf-8")


class _Recorder:
    """Collects a unit's decision rows and its surviving samples, in input order."""

    def __init__(self, cfg: PrepConfig, source: Source) -> None:
        self.cfg, self.source = cfg, source
        self.rows: list[dict[str, Any]] = []
        self.kept: list[tuple[int, KeptSample]] = []

    def reject(self, item: Sample | Rejected, pos: int, stage: str, stage_pos: float, reason: str,
               measures: dict[str, Any] | None = None, retryable: bool = False) -> None:
        self.rows.append({**(measures or {}), "uid": item.uid, "source": item.source, "source_id": item.source_id,
                          "url": getattr(item, "url", None), "caption": _text(getattr(item, "caption", None)),
                          "kept": False, "filter": stage, "reason": reason,
                          "retryable": retryable, "pos": pos, "stage_pos": stage_pos})

    def keep(self, sample: Sample, pos: int, measures: dict[str, Any]) -> None:
        split = assign_split(sample.uid, self.source.cfg.heldout_fraction, self.cfg.seed)
        self.rows.append({**measures, "uid": sample.uid, "source": sample.source, "source_id": sample.source_id,
                          "url": sample.url, "caption": sample.caption, "split": split, "kept": True, "retryable": False, "pos": pos})
        self.kept.append((pos, KeptSample(sample, measures)))


Entry = tuple[int, Sample, dict]  # (position in the unit, sample, its measures so far)


def _start_fetch(ctx: Context, entries: list[Entry]) -> list[tuple[int, Future]]:
    """Queue the downloads of the images ``entries`` lack; returns (entry index, future) pairs."""
    return [(i, ctx.downloader.submit(e[1].url or "")) for i, e in enumerate(entries) if e[1].image is None]


def _end_fetch(entries: list[Entry], pending: list[tuple[int, Future]], rec: _Recorder, stage_pos: float) -> list[Entry]:
    """Wait for the downloads; failures are recorded under ``download``, the rest carry their image."""
    failed = set()
    for i, future in pending:
        pos, sample, measures = entries[i]
        f = future.result()
        if f.reason is not None:
            rec.reject(sample, pos, DOWNLOAD_STAGE, stage_pos, f.reason, measures, f.retryable)
            failed.add(i)
        else:
            sample.image, sample.image_ext = f.data, f.ext or "jpg"
    return [e for i, e in enumerate(entries) if i not in failed]


def first_image_stage(stages: Sequence[Filter]) -> int:
    """Index of the first stage that needs the image (where downloads happen), or ``len(stages)``."""
    return next((k for k, s in enumerate(stages) if s.needs_image), len(stages))


def run_stages(ctx: Context, batch: list[Entry], rec: _Recorder, start: int = 0, stop: int | None = None) -> list[Entry]:
    """Apply stages ``start:stop`` in order to the entries; return the survivors. The images must
    already be fetched for the stages from ``first_image_stage`` on."""
    for k in range(start, len(ctx.stages) if stop is None else stop):
        stage = ctx.stages[k]
        if not batch:
            break
        survivors = []
        for (pos, sample, measures), (result, reason) in zip(batch, judge(stage, [s for _, s, _ in batch])):
            measures.update(result)
            if reason is not None:
                rec.reject(sample, pos, stage.name, k, reason, measures)
            else:
                survivors.append((pos, sample, measures))
        batch = survivors
    return batch


def _finish(ctx: Context, pos: int, sample: Sample, measures: dict, rec: _Recorder) -> None:
    """Re-encode a surviving sample for the shard and complete its contract meta."""
    try:
        sample.caption.encode("utf-8")
    except UnicodeEncodeError as e:  # only possible when no caption stage is configured
        rec.reject(sample, pos, WRITE_STAGE, len(ctx.stages), f"caption_not_utf8: undecodable bytes at {e.start}",
                   measures)
        return
    try:
        data, ext, (w, h) = encode_for_shard(sample, ctx.cfg.resize)
        meta = sample.meta
        if meta.get("original_width") is None or meta.get("original_height") is None:
            # encode_for_shard decoded the image (cached on the sample), recording the file's own size.
            meta["original_width"], meta["original_height"] = images.original_size(sample.decoded)
    except (Reject, *DECODE_ERRORS) as e:
        rec.reject(sample, pos, WRITE_STAGE, len(ctx.stages), f"encode_error: {type(e).__name__}: {e}"
                   if not isinstance(e, Reject) else str(e), measures)
        return
    meta["width"], meta["height"] = w, h
    if meta.get("lang") is None:
        meta["lang"] = "und"  # no language stage and the source does not know
    sample.image, sample.image_ext, sample.decoded = data, ext, None
    rec.keep(sample, pos, measures)


def _batches(items: Iterator[Sample | Rejected], size: int) -> Iterator[list[tuple[int, Sample | Rejected]]]:
    batch: list[tuple[int, Sample | Rejected]] = []
    for pos, item in enumerate(items):
        batch.append((pos, item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def process_items(ctx: Context, source: Source, items: Iterator[Sample | Rejected]) -> _Recorder:
    """Run a unit's items through the stages, batch by batch.

    Downloads overlap the work: a batch's text stages run, then its downloads are queued, and the
    image stages of a batch run only once ``download.prefetch`` later batches are downloading too,
    so a slow URL delays one batch instead of stalling the worker. Rows are sorted by position
    afterwards, so the outputs do not depend on which download finished first."""
    rec = _Recorder(ctx.cfg, source)
    k = first_image_stage(ctx.stages)
    window: deque = deque()

    def complete() -> None:
        batch, entries, pending = window.popleft()
        entries = _end_fetch(entries, pending, rec, k - 0.5)
        for pos, sample, measures in run_stages(ctx, entries, rec, start=k):
            _finish(ctx, pos, sample, measures, rec)
        for _, item in batch:  # decoded pixels are only needed within the batch
            if isinstance(item, Sample):
                item.decoded = None
        ctx.progress(len(batch))

    for batch in _batches(items, ctx.cfg.batch_size):
        entries = []
        for pos, item in batch:
            if isinstance(item, Rejected):
                rec.reject(item, pos, SOURCE_STAGE, -1, item.reason)
            else:
                entries.append((pos, item, {}))
        entries = run_stages(ctx, entries, rec, stop=k)
        window.append((batch, entries, _start_fetch(ctx, entries)))
        if len(window) > ctx.cfg.download.prefetch:
            complete()
    while window:
        complete()
    return rec


def process_unit(ctx: Context, unit: Unit) -> dict[str, Any]:
    """Process one unit (or, with ``retry_failed``, only its retryable download failures) and
    publish its results; returns the unit's summary (also in its ``DONE`` file)."""
    start = time.perf_counter()
    folder = unit_dir(ctx.cfg, unit)
    source = ctx.sources[unit.source]
    items = source.read(unit.unit, work_dir(ctx.cfg) / "sources")
    previous = None
    if (folder / DONE_NAME).exists():  # only reached with retry_failed: redo the transient failures
        previous = pq.read_table(folder / UNIT_DECISIONS)
        retry = {r["uid"] for r in previous.select(["uid", "filter", "retryable"]).to_pylist()
                 if r["filter"] == DOWNLOAD_STAGE and r["retryable"]}
        if not retry:
            ctx.progress(len(previous))
            return json.loads((folder / DONE_NAME).read_text())
        items = (it for it in items if it.uid in retry)
        (folder / DONE_NAME).unlink()  # the unit is being rewritten: not done until the new DONE
    rec = process_items(ctx, source, items)
    blobs = [(pos, k.sample.uid, record_bytes(tar_record(k))) for pos, k in rec.kept]
    rows = rec.rows
    if previous is not None:
        rows, blobs = _merge_retry(folder, previous, rows, blobs)
    rows.sort(key=lambda r: r["pos"])
    blobs.sort(key=lambda b: b[0])
    row_of = {r["uid"]: r for r in rows}
    with atomic_write(folder / SAMPLES_NAME, "wb") as f:
        tar = TarAppender(f)
        for _, uid, blob in blobs:
            row_of[uid]["tar_offset"], row_of[uid]["tar_size"] = tar.append(blob)
        tar.finish()
    with atomic_write(folder / UNIT_DECISIONS, "wb") as f:
        pq.write_table(rows_table(rows, ctx.table_schema), f)
    kept = blobs
    summary = {"unit": unit.index, "source": unit.source, "inputs": len(rows), "kept": len(kept),
               "seconds": round(time.perf_counter() - start, 3)}
    with atomic_write(folder / DONE_NAME, "w") as f:
        json.dump(summary, f)
    return summary


def _merge_retry(folder: Path, previous: pa.Table, new_rows: list[dict], new_blobs: list) -> tuple[list, list]:
    """Previous rows and samples with the retried items' new outcomes in place of their failures.

    Retried items were read alone, so their ``pos`` is re-based to their position in the unit;
    samples kept earlier are carried over as the exact bytes of the old unit tar."""
    prev_rows = previous.to_pylist()
    pos_of = {r["uid"]: r["pos"] for r in prev_rows}
    for r in new_rows:
        r["pos"] = pos_of[r["uid"]]
    retried = {r["uid"] for r in new_rows}
    rows = [r for r in prev_rows if r["uid"] not in retried] + new_rows
    old_blobs = []
    with open(folder / SAMPLES_NAME, "rb") as f:
        for r in prev_rows:
            if r["kept"] and r["uid"] not in retried:
                f.seek(r["tar_offset"])
                old_blobs.append((r["pos"], r["uid"], f.read(r["tar_size"])))
    return rows, old_blobs + [(pos_of[uid], uid, blob) for _, uid, blob in new_blobs]
