"""The merge: judge the global stages over every worker's measures, then write the final dataset.

Runs once every unit is done (on one machine: worker 0 of a multi-machine build):

1. the units' decisions are concatenated in plan order (the build order);
2. each global stage (corpus frequency, duplicates, CLIP top-k%), in config order, judges the
   samples that survived every stage before it in the config, wherever they were measured;
3. the kept samples are copied, as byte ranges and in build order, from the units' tars into
   balanced shards of ``samples_per_shard`` (in parallel, one job per output shard), each split
   gets its ``manifest.json``, and ``decisions.parquet`` gets one row per input.

Re-running the merge gives the same bytes: nothing here depends on timing or worker count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import PrepError
from data_prep.atomic import atomic_write, sha256_file
from data_prep.config import PrepConfig
from data_prep.decisions import BASE_COLUMNS, WRITE_STAGE
from data_prep.filters import Filter
from data_prep.filters.duplicates import first_occurrence
from data_prep.manifest import Manifest, ShardInfo
from data_prep.plan import Plan, Unit
from data_prep.sample_index import SUFFIX as INDEX_SUFFIX
from data_prep.sample_index import write_sample_index
from data_prep.shards import SHARD_GLOB, SHARD_NAME, TarAppender, copy_ranges
from data_prep.split import SPLITS
from data_prep.worker import INTERNAL_COLUMNS, SAMPLES_NAME, UNIT_DECISIONS, is_done, unit_dir

Mapper = Callable[[Callable, Sequence], list]  # runs a picklable function over jobs, maybe in parallel


def missing_units(cfg: PrepConfig, plan: Plan) -> list[Unit]:
    return [u for u in plan.units if not is_done(cfg, u)]


def gather_decisions(cfg: PrepConfig, plan: Plan) -> pa.Table:
    """Every unit's decisions in plan order, with the unit index as a column (``unit``)."""
    missing = missing_units(cfg, plan)
    if missing:
        names = ", ".join(u.name for u in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise PrepError(f"{len(missing)} of {len(plan.units)} units are not done ({names}): run the remaining "
                        f"workers (`python -m data_prep process ...`) before the merge")
    tables = []
    for u in plan.units:
        t = pq.read_table(unit_dir(cfg, u) / UNIT_DECISIONS)
        tables.append(t.append_column("unit", pa.array(np.full(len(t), u.index, np.int64))))
    return pa.concat_tables(tables)


def judge_globals(table: pa.Table, stages: Sequence[Filter]) -> tuple[pa.Table, dict[str, dict[str, Any]]]:
    """Apply the global stages in config order; returns the updated table and each stage's summary."""
    stage_pos = table["stage_pos"].to_numpy(zero_copy_only=False).astype(np.float64)  # NaN: not rejected
    filters = np.array(table["filter"].to_pylist(), dtype=object)
    reasons = np.array(table["reason"].to_pylist(), dtype=object)
    summaries: dict[str, dict[str, Any]] = {}
    for k, stage in enumerate(stages):
        if not stage.is_global:
            continue
        alive = np.isnan(stage_pos) | (stage_pos > k)  # survived every stage before k
        columns = ["uid", "source", *(c for c in stage.measure_types if c in table.column_names)]
        verdicts = stage.global_reasons(table.select(columns), alive)
        if len(verdicts) != len(table):
            raise PrepError(f"filter {stage.name}: global_reasons returned {len(verdicts)} verdicts for {len(table)} rows")
        hit = np.array([v is not None for v in verdicts], dtype=bool)
        if np.any(hit & ~alive):
            raise PrepError(f"filter {stage.name} rejected samples that an earlier stage had already rejected")
        stage_pos[hit] = k
        filters[hit] = stage.name
        reasons[hit] = np.array(verdicts, dtype=object)[hit]
        summaries[stage.name] = dict(getattr(stage, "summary", {}) or {})
    # A uid is a shard key, so it must be unique. Sources may carry their own (a shard's json "uid"),
    # and two copies of one shard in two units would repeat them: only the first copy is kept.
    repeats, _ = first_occurrence(table["uid"], np.isnan(stage_pos))
    stage_pos[repeats] = len(stages)
    filters[repeats] = WRITE_STAGE
    reasons[repeats] = "duplicate_uid: an earlier sample of the build has the same uid"
    kept = pa.array(np.isnan(stage_pos))
    split = pc.if_else(kept, table["split"], pa.scalar(None, pa.string()))
    table = table.set_column(table.column_names.index("kept"), "kept", kept)
    table = table.set_column(table.column_names.index("split"), "split", split)
    table = table.set_column(table.column_names.index("filter"), "filter", pa.array(filters.tolist(), pa.string()))
    table = table.set_column(table.column_names.index("reason"), "reason", pa.array(reasons.tolist(), pa.string()))
    return table, summaries


@dataclass(frozen=True)
class ShardJob:
    path: str
    segments: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # (unit tar, byte ranges to copy, in order)
    samples: int


def shard_jobs(cfg: PrepConfig, plan: Plan, table: pa.Table, split: str, folder: Path) -> list[ShardJob]:
    """Cut the split's kept samples, in build order, into shards of ``samples_per_shard``."""
    rows = table.filter(pc.and_(table["kept"], pc.equal(table["split"], split)))
    units = rows["unit"].to_pylist()
    offsets = rows["tar_offset"].to_pylist()
    sizes = rows["tar_size"].to_pylist()
    tar_of = {u.index: str(unit_dir(cfg, u) / SAMPLES_NAME) for u in plan.units}
    jobs = []
    n = cfg.samples_per_shard
    for i, start in enumerate(range(0, len(units), n)):
        segments: list[tuple[str, list[tuple[int, int]]]] = []
        for unit, offset, size in zip(units[start: start + n], offsets[start: start + n], sizes[start: start + n]):
            if not segments or segments[-1][0] != tar_of[unit]:
                segments.append((tar_of[unit], []))
            segments[-1][1].append((offset, size))
        jobs.append(ShardJob(str(folder / SHARD_NAME.format(i)), tuple((t, tuple(r)) for t, r in segments),
                             min(n, len(units) - start)))
    return jobs


def write_shard_job(job: ShardJob) -> ShardInfo:
    """Copy the job's samples, byte for byte, from the unit tars into one shard (atomically)."""
    path = Path(job.path)
    with atomic_write(path, "wb") as f:
        out = TarAppender(f)
        for tar, ranges in job.segments:
            copy_ranges(out, tar, ranges)
        end = out.offset
        out.finish()
    write_sample_index(path, out.starts, end)  # after the shard: an index never describes a shard that is not there
    return ShardInfo(name=path.name, samples=job.samples, bytes=path.stat().st_size, sha256=sha256_file(path))


def write_splits(cfg: PrepConfig, plan: Plan, table: pa.Table, config: dict[str, Any], mapper: Mapper) -> dict[str, Manifest]:
    """Every split's shards and manifest; shards of an earlier build that are not listed are removed."""
    out = Path(cfg.out_dir)
    manifests = {}
    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        shards = mapper(write_shard_job, shard_jobs(cfg, plan, table, split, folder))
        manifest = Manifest(shards=list(shards), split=split, config=config, root=folder, index_suffix=INDEX_SUFFIX)
        manifest.save()
        listed = {s.name for s in shards}
        for stale in [*folder.glob(SHARD_GLOB), *folder.glob(SHARD_GLOB + INDEX_SUFFIX)]:
            if stale.name.removesuffix(INDEX_SUFFIX) not in listed:
                stale.unlink()
        manifests[split] = manifest
    return manifests


def write_decisions(table: pa.Table, path: Path) -> Path:
    """The public decisions: base columns then measures (internal bookkeeping columns dropped)."""
    internal = {"unit", *INTERNAL_COLUMNS}
    ordered = [*BASE_COLUMNS, *(c for c in table.column_names if c not in internal and c not in BASE_COLUMNS)]
    with atomic_write(path, "wb") as f:
        pq.write_table(table.select(ordered), f)
    return path


def split_captions(table: pa.Table, split: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions of a split's kept samples, in build order (the tokenizer's corpus)."""
    kept = table.filter(pc.and_(table["kept"], pc.equal(table["split"], split)))["caption"]
    seen: dict[str, None] = {}
    for chunk in kept.chunks:
        for caption in chunk.to_pylist():
            seen.setdefault(caption, None)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)
