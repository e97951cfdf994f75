"""``build(cfg)``: sources -> filters -> split -> shards, manifests, decisions, tokenizer, report.

Everything is written under ``cfg.out_dir``::

    out_dir/train/shard-000000.tar ... manifest.json
    out_dir/heldout/shard-000000.tar ... manifest.json
    out_dir/decisions.parquet  out_dir/tokenizer.model  out_dir/tokenizer.vocab  out_dir/report.md

Kept samples are held in memory until sharded (they are written in uid order, which needs them
all): fine for the demo's ~60 MB; a streaming external sort is the next step for large sources.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from data_prep import PrepError
from data_prep.atomic import atomic_write
from data_prep.config import PrepConfig, load_config, to_dict
from data_prep.decisions import (BASE_COLUMNS, DECISIONS_NAME, SOURCE_STAGE, Decision, FunnelRow, funnel,
                                 reason_counts, render_funnel, render_reasons, write_decisions)
from data_prep.filters import Filter, apply_filters, make_filter
from data_prep.manifest import Manifest
from data_prep.shards import KeptSample, write_split
from data_prep.sources import Rejected, Sample, make_source
from data_prep.sources.base import REQUIRED_META
from data_prep.tokenizer import train_tokenizer

SPLITS = ("train", "heldout")
REPORT_NAME = "report.md"


@dataclass
class BuildResult:
    out_dir: Path
    manifests: dict[str, Manifest]  # split -> manifest
    decisions_path: Path
    tokenizer_path: Path
    report_path: Path
    funnel: list[FunnelRow]
    seconds: float


def assign_split(uid: str, heldout_fraction: float, seed: int) -> str:
    """``heldout`` for a ``heldout_fraction`` share of uids, decided by a hash: stable across runs,
    independent of which other samples exist, and reshuffled only by changing ``seed``."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")
    return "heldout" if h < heldout_fraction * 2**64 else "train"


def decide(item: Sample | Rejected, filters: Sequence[Filter], heldout_fraction: float, seed: int) -> Decision:
    """The fate of one input item: rejected (by its source or the first failing filter) or a split."""
    ident = {"uid": item.uid, "source": item.source, "source_id": item.source_id}
    if isinstance(item, Rejected):
        return Decision(**ident, split=None, filter=SOURCE_STAGE, reason=item.reason)
    verdict = apply_filters(filters, item)
    if not verdict.kept:
        return Decision(**ident, split=None, filter=verdict.filter, reason=verdict.reason, measures=verdict.measures)
    # A sample without the contract's meta must not reach a shard, whichever filters are configured.
    missing = [k for k in REQUIRED_META if item.meta.get(k) is None]
    if missing:
        return Decision(**ident, split=None, filter=SOURCE_STAGE, reason=f"missing_meta: {', '.join(missing)}",
                        measures=verdict.measures)
    return Decision(**ident, split=assign_split(item.uid, heldout_fraction, seed), measures=verdict.measures)


def measure_columns(filters: Sequence[Filter]) -> dict[str, type]:
    """All filters' measure names -> types; two filters may not record under the same name."""
    types: dict[str, type] = {}
    for f in filters:
        for name, typ in f.measure_types.items():
            if name in types or name in BASE_COLUMNS:
                raise PrepError(f"filter {f.name!r} measures {name!r}, a name already used; rename one of them")
            types[name] = typ
    return types


def render_report(cfg: PrepConfig, rows: list[FunnelRow], decisions: Sequence[Decision],
                  manifests: dict[str, Manifest]) -> str:
    stages = [SOURCE_STAGE, *cfg.filters]
    lines = [
        f"# Dataset build: {cfg.out_dir}", "",
        "## Funnel", "",
        "Inputs per source, rejected at each stage in run order (`-source`: unusable input such as a "
        "missing caption), and kept samples per split.", "",
        render_funnel(rows, stages, SPLITS), "",
        "## Rejection reasons", "",
        render_reasons(reason_counts(decisions)) if any(not d.kept for d in decisions) else "(none)", "",
        "## Shards", "",
        *(f"- `{split}/`: {m.total_samples} samples in {len(m.shards)} shard(s), {m.total_bytes / 1e6:.1f} MB"
          for split, m in manifests.items()), "",
    ]
    return "\n".join(lines)


def build(cfg: PrepConfig) -> BuildResult:
    """Build the dataset described by ``cfg`` (a validated ``PrepConfig``) into ``cfg.out_dir``."""
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    resolved = to_dict(cfg)
    # Open every source and filter first: a missing root or bad option fails before any work.
    sources = [make_source(name, options) for name, options in cfg.sources.items()]
    filters = [make_filter(name, options) for name, options in cfg.filters.items()]
    columns = measure_columns(filters)

    decisions: list[Decision] = []
    kept: dict[str, list[KeptSample]] = {split: [] for split in SPLITS}
    for source in sources:
        for item in tqdm(source, total=len(source), desc=source.name, unit="sample", disable=None):
            d = decide(item, filters, source.cfg.heldout_fraction, cfg.seed)
            decisions.append(d)
            if d.kept:
                kept[d.split].append(KeptSample(item, d.measures))

    manifests = {split: write_split(kept[split], out / split, split, cfg.samples_per_shard, resolved)
                 for split in SPLITS}
    decisions_path = write_decisions(decisions, columns, out / DECISIONS_NAME)
    rows = funnel(decisions)
    report = render_report(cfg, rows, decisions, manifests)
    report_path = out / REPORT_NAME
    with atomic_write(report_path, "wb") as f:
        f.write(report.encode("utf-8"))
    tokenizer_path = train_tokenizer((k.sample.caption for k in kept["train"]), out,
                                     cfg.tokenizer.vocab_size, cfg.tokenizer.model_type.value, cfg.seed)
    seconds = time.perf_counter() - start
    print(f"{report}\nbuilt {out} in {seconds:.1f} s", file=sys.stdout, flush=True)
    return BuildResult(out, manifests, decisions_path, tokenizer_path, report_path, rows, seconds)


def build_from_overrides(overrides: list[str] | None = None) -> BuildResult:
    """``build`` with ``conf/prep.yaml`` plus hydra ``overrides`` (e.g. ``["out_dir=/tmp/d"]``), in-process."""
    return build(load_config(overrides))
