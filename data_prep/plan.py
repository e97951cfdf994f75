"""The plan: every unit of work of a build, in the order their samples reach the shards.

Written once to ``<out_dir>/.work/plan.json`` and reused by every later run and every worker, so a
killed build resumes over the same units and workers on other machines agree on who does what
(unit ``i`` belongs to worker ``i % world``). Units of all sources are interleaved in a seeded
pseudo-random order, so each shard mixes sources instead of holding one source after another.

The plan also pins the config that shapes the outputs (its fingerprint): resuming with different
sources, filters or resize settings would mix two datasets, so it is refused with a clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep import PrepError
from data_prep.atomic import atomic_write
from data_prep.config import PrepConfig, to_dict
from data_prep.sources import Source

WORK_DIR = ".work"
PLAN_NAME = "plan.json"
# Config keys whose values change what the units produce (not how fast or by whom).
FINGERPRINT_KEYS = ("seed", "unit_size", "sources", "filters", "resize")


@dataclass(frozen=True)
class Unit:
    index: int  # position in the build order
    source: str  # the config entry (label) of its source
    unit: str  # the source's own id of the unit

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


@dataclass
class Plan:
    fingerprint: str
    units: list[Unit]
    config: dict[str, Any]

    def mine(self, rank: int, world: int) -> list[Unit]:
        return [u for u in self.units if u.index % world == rank]


def fingerprint(cfg: PrepConfig) -> tuple[str, dict[str, Any]]:
    shaping = {k: to_dict(getattr(cfg, k)) for k in FINGERPRINT_KEYS}
    blob = json.dumps(shaping, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], shaping


def work_dir(cfg: PrepConfig) -> Path:
    return Path(cfg.out_dir) / WORK_DIR


def make_plan(cfg: PrepConfig, sources: dict[str, Source]) -> Plan:
    """List every source's units (sources may write chunk files under the work folder) and order them."""
    fp, shaping = fingerprint(cfg)
    listed: list[tuple[str, str]] = []
    for label, source in sources.items():
        listed += [(label, u) for u in source.plan(work_dir(cfg) / "sources", cfg.unit_size)]

    def order(entry: tuple[str, str]) -> bytes:
        return hashlib.blake2b(f"{cfg.seed}\x00{entry[0]}\x00{entry[1]}".encode(), digest_size=8).digest()

    units = [Unit(i, label, u) for i, (label, u) in enumerate(sorted(listed, key=order))]
    return Plan(fp, units, shaping)


def save_plan(plan: Plan, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump({"fingerprint": plan.fingerprint, "config": plan.config,
                   "units": [asdict(u) for u in plan.units]}, f, indent=0)


def read_plan(path: Path) -> Plan:
    raw = json.loads(path.read_text())
    return Plan(raw["fingerprint"], [Unit(**u) for u in raw["units"]], raw.get("config", {}))


def load_or_make_plan(cfg: PrepConfig, sources: dict[str, Source], rank: int, timeout: float) -> Plan:
    """The build's plan: read it if an earlier run (or worker 0) wrote it, else make it (worker 0 only;
    the others wait for it, so a large table is streamed once, not once per worker)."""
    path = work_dir(cfg) / PLAN_NAME
    fp, shaping = fingerprint(cfg)
    if not path.exists():
        if rank == 0:
            save_plan(make_plan(cfg, sources), path)
        else:
            wait_for(path, timeout, "worker 0 to write the plan")
    plan = read_plan(path)
    if plan.fingerprint != fp:
        changed = sorted(k for k in shaping if shaping[k] != plan.config.get(k))
        raise PrepError(
            f"{cfg.out_dir} holds a build made with a different config (changed: {', '.join(changed) or '?'}); "
            f"use a new out_dir, or delete {path.parent} to rebuild from scratch"
        )
    return plan


def wait_for(path: Path, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout:
            raise PrepError(f"gave up after {timeout:.0f} s waiting for {what} ({path}) on {socket.gethostname()} "
                            f"pid {os.getpid()}; is worker 0 running? raise workers.wait_timeout to wait longer")
        time.sleep(0.5)
