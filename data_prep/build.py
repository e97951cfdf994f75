"""``build(cfg)``: plan -> process units (in parallel, resumable) -> merge -> tokenizer -> report.

Everything is written under ``cfg.out_dir``::

    out_dir/train/shard-000000.tar ... manifest.json     the dataset (``heldout/`` likewise)
    out_dir/decisions.parquet  out_dir/tokenizer.model  out_dir/report.md  out_dir/report/*.png
    out_dir/config.yaml                                  the resolved config
    out_dir/.work/                                       plan and per-unit results (resume, retries)

On one machine ``build`` does it all, with ``workers.processes`` processes. Across machines (torchrun
ranks or a Slurm job array) every worker runs ``build`` (or ``process``) on its share of the units
and worker 0 merges once all units are done; see ``worker_rank``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import OmegaConf
from tqdm import tqdm

from data_prep import PrepError
from data_prep.atomic import atomic_write, ensure_writable_dir
from data_prep.config import PrepConfig, load_config, to_dict
from data_prep.decisions import DECISIONS_NAME, FunnelRow
from data_prep.manifest import Manifest
from data_prep.merge import gather_decisions, judge_globals, missing_units, split_captions, write_decisions, write_splits
from data_prep.plan import Plan, Unit, load_or_make_plan, wait_for
from data_prep.report import PLOTS_DIR, plot_measures, render_report, summarise, write_report
from data_prep.tokenizer import train_tokenizer
from data_prep.worker import DONE_NAME, Context, is_done, open_sources, process_unit, unit_dir

CONFIG_NAME = "config.yaml"
RUN_ONLY_KEYS = ("out_dir", "workers", "retry_failed")  # in config.yaml, not in the manifests


@dataclass
class BuildResult:
    out_dir: Path
    manifests: dict[str, Manifest]  # split -> manifest
    decisions_path: Path
    tokenizer_path: Path
    report_path: Path
    funnel: list[FunnelRow]
    seconds: float


def worker_rank(cfg: PrepConfig) -> tuple[int, int]:
    """``(rank, world)`` of this machine: the config's, else torchrun's, else a Slurm array task's."""
    env = os.environ
    if cfg.workers.world is not None:
        return cfg.workers.rank or 0, cfg.workers.world
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def usable_cpus() -> int:
    """CPUs this process may run on: a Slurm task or container is bound to some of the host's cores,
    and one worker per host core would oversubscribe them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes(cfg: PrepConfig, jobs: int) -> int:
    return max(1, min(jobs, cfg.workers.processes or usable_cpus()))


# --- worker processes: each builds its Context once and reports progress through a shared counter.
_CTX: Optional[Context] = None


def _init_worker(cfg: PrepConfig, counter: Any) -> None:
    global _CTX

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _CTX = Context.create(cfg)
    _CTX.progress = progress


def _run_unit(unit: Unit) -> dict[str, Any]:
    assert _CTX is not None
    return process_unit(_CTX, unit)


def _progress_loop(futures: Sequence[Future], bar: tqdm, samples: Callable[[], int] | None = None) -> list[Any]:
    """Wait for ``futures``, moving ``bar`` by finished futures (so it has an ETA) and showing the
    ``samples()`` count as a postfix; the first failure is raised."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        bar.update(len(futures) - len(pending) - bar.n)
        if samples is not None:
            bar.set_postfix(samples=samples(), refresh=False)
        for f in done:
            f.result()
    return [f.result() for f in futures]


def open_pool(cfg: PrepConfig, jobs: int) -> tuple[Optional[ProcessPoolExecutor], Any]:
    """``(pool, progress counter)`` for ``jobs`` units, or ``(None, None)`` when one process is enough.
    Spawned (not forked): the workers hold download threads and possibly a model."""
    n = processes(cfg, jobs)
    if n == 1:
        return None, None
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(cfg, counter)), counter


def process(cfg: PrepConfig, plan: Plan, units: Sequence[Unit],
            pool: tuple[Optional[ProcessPoolExecutor], Any] = (None, None)) -> list[dict[str, Any]]:
    """Process ``units`` (skipping done ones unless retrying failures) in ``pool`` or in this process."""
    todo = [u for u in units if cfg.retry_failed or not is_done(cfg, u)]
    if not todo:
        return []
    executor, counter = pool
    with tqdm(total=len(todo), desc="process", unit="unit", disable=None, smoothing=0.1) as bar:
        if executor is None:
            ctx = Context.create(cfg)
            seen = [0]

            def progress(k: int) -> None:
                seen[0] += k
                bar.set_postfix(samples=seen[0], refresh=False)

            ctx.progress = progress
            try:
                out = []
                for u in todo:
                    out.append(process_unit(ctx, u))
                    bar.update(1)
                return out
            finally:
                ctx.close()
        start = counter.value
        futures = [executor.submit(_run_unit, u) for u in todo]
        return _progress_loop(futures, bar, lambda: counter.value - start)


def _mapper(executor: Optional[ProcessPoolExecutor], desc: str) -> Callable[[Callable, Sequence], list]:
    """Map a picklable function over jobs in ``executor`` (or here), with a progress bar."""

    def run(fn: Callable, jobs: Sequence) -> list:
        with tqdm(total=len(jobs), desc=desc, unit="shard", disable=None) as bar:
            if executor is None or len(jobs) < 2:
                out = []
                for j in jobs:
                    out.append(fn(j))
                    bar.update(1)
                return out
            return _progress_loop([executor.submit(fn, j) for j in jobs], bar)

    return run


def merge(cfg: PrepConfig, plan: Plan, start: float, executor: Optional[ProcessPoolExecutor] = None) -> BuildResult:
    """Judge the global stages and write shards, manifests, decisions, tokenizer and report."""
    from data_prep.filters import make_filter

    out = Path(cfg.out_dir)
    resolved = to_dict(cfg)
    stages = [make_filter(name, options) for name, options in cfg.filters.items()]
    table, summaries = judge_globals(gather_decisions(cfg, plan), stages)
    # The manifest records what determines the data, not where or how it was built, so a resumed,
    # relocated or multi-worker build publishes the very same manifest bytes.
    data_config = {k: v for k, v in resolved.items() if k not in RUN_ONLY_KEYS}
    manifests = write_splits(cfg, plan, table, data_config, _mapper(executor, "shards"))
    decisions_path = write_decisions(table, out / DECISIONS_NAME)
    if manifests["train"].total_samples == 0:
        raise PrepError("no samples were kept for the train split: see decisions.parquet and the funnel above "
                        "for what the filters removed")
    tokenizer_path = train_tokenizer(split_captions(table, "train", cfg.tokenizer.max_sentences), out,
                                     cfg.tokenizer.vocab_size, cfg.tokenizer.model_type.value, cfg.seed)
    with atomic_write(out / CONFIG_NAME, "w") as f:
        f.write(OmegaConf.to_yaml(resolved))
    thresholds = {name: {**to_dict(options), **summaries.get(name, {})} for name, options in cfg.filters.items()}
    plots = plot_measures(table, thresholds, out / PLOTS_DIR)
    seconds = time.perf_counter() - start
    outcome = summarise(table, list(cfg.filters))
    global_summaries = {k: v for k, v in summaries.items() if v}
    report_path = write_report(out, render_report(out, outcome, manifests, plots, global_summaries, seconds))
    print("\n" + outcome.funnel_md, file=sys.stdout)
    if outcome.reasons_md is not None:
        print("\n" + outcome.reasons_md, file=sys.stdout)
    print(f"\nbuilt {out} in {seconds:.1f} s: report {report_path}", file=sys.stdout, flush=True)
    return BuildResult(out, manifests, decisions_path, tokenizer_path, report_path, outcome.rows, seconds)


def prepare(cfg: PrepConfig) -> tuple[Plan, int, int]:
    """Open the sources (fail fast) and read or make the plan; returns ``(plan, rank, world)``."""
    from data_prep.filters import make_filter

    rank, world = worker_rank(cfg)
    sources = open_sources(cfg)
    # Construct every stage here once (cheap: models load lazily) so that a bad option, e.g. a CLIP
    # checkpoint that is not an export, fails in one line before any worker process starts.
    for stage in [make_filter(name, options) for name, options in cfg.filters.items()]:
        stage.close()
    ensure_writable_dir(cfg.out_dir, "out_dir")  # after the input checks: a bad input creates no out_dir
    plan = load_or_make_plan(cfg, sources, rank, cfg.workers.wait_timeout)
    return plan, rank, world


def build(cfg: PrepConfig) -> Optional[BuildResult]:
    """Build the dataset described by ``cfg`` into ``cfg.out_dir``: this worker's units, then (worker 0)
    the merge once every unit is done. Returns None on workers other than 0."""
    start = time.perf_counter()
    plan, rank, world = prepare(cfg)
    mine = plan.mine(rank, world)
    # One pool for the units and the merge's shard writing: spawning workers costs seconds.
    executor, counter = open_pool(cfg, max(len(mine), 2))
    try:
        process(cfg, plan, mine, (executor, counter))
        if rank != 0:
            return None
        for unit in missing_units(cfg, plan):
            wait_for(unit_dir(cfg, unit) / DONE_NAME, cfg.workers.wait_timeout,
                     f"unit {unit.name} from worker {unit.index % world}")
        return merge(cfg, plan, start, executor)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def build_from_overrides(overrides: list[str] | None = None) -> Optional[BuildResult]:
    """``build`` with ``conf/prep.yaml`` plus hydra ``overrides`` (e.g. ``["out_dir=/tmp/d"]``), in-process."""
    return build(load_config(overrides))
