"""What two builds of the same dataset must share byte for byte, and the small real build they use
(resume, multi-worker, Slurm array and chaos tests compare against an uninterrupted run)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq

from tests import stamps

# ~470 real inputs in units of 40: a dozen units, so kills land between and inside units.
BASE = ["sources.fashion_mnist.limit=300", f"sources.tuxpaint.root={stamps.ROOT}", "sources.tuxpaint.limit=170",
        "samples_per_shard=100",
        "tokenizer.vocab_size=500", "unit_size=40", "batch_size=16"]


def fingerprint(out: Path) -> dict[str, object]:
    """Everything the dataset's users read: shard bytes, manifests, decisions, tokenizer."""
    files = sorted(p for p in out.glob("*/shard-*.tar")) + sorted(out.glob("*/manifest.json"))
    digest = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    digest["decisions"] = pq.read_table(out / "decisions.parquet").to_pylist()
    digest["tokenizer"] = hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    return digest
