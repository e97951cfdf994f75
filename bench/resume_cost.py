"""Resume cost: time to the first batch after resuming at 10%, 50% and 90% of an epoch, against a
fresh start, in one run.

    .venv/bin/python bench/resume_cost.py [--shards 32] [--per-shard 1000] [--repeats 3]
    .venv/bin/python bench/resume_cost.py --smoke        # seconds: tiny sizes

The dataset is synthetic (a scale benchmark: random 64 px JPEG images with short captions, written as
WebDataset shards with ``python -m data_prep index``'s manifest and sample indexes). The loader is
the trainer's own (``TrainLoader``: 2 loader workers, batch 64, shuffle blocks of 2,000). A resume
restores a data position at the given fraction of each consumer's epoch (what a checkpoint holds),
then times ``next()``: worker start-up, the seek, one shuffle block, the decode of one batch. The
fresh start times the same call from position 0. Each is the median of ``--repeats`` runs.

The same resumes are timed once more with the sample indexes hidden from the manifest: each then
reads its block's shard from the start (bounded by one shard, not the epoch before it).

Last line: ``resume_vs_fresh_max: X`` (the slowest indexed resume / the fresh start; target <= 1.2).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

import smoke
from data_prep.index import write_index
from data_prep.manifest import load_manifest
from data_prep.tokenizer import train_tokenizer
from pretrain.config import DataConfig
from pretrain.data import TrainLoader, Tokenizer

SMOKE = {"shards": 4, "per_shard": 60, "repeats": 1, "batch_size": 8, "block": 20}
WORKERS = 2
FRACTIONS = (0.1, 0.5, 0.9)


def write_dataset(root: Path, shards: int, per_shard: int, seed: int = 0) -> Path:
    """Synthetic shards, their manifest and sample indexes, and a tokenizer; returns the train folder."""
    rng = np.random.default_rng(seed)
    train = root / "train"
    train.mkdir(parents=True)
    words = ["red", "blue", "small", "large", "cat", "dog", "tree", "house", "car", "bird"]
    captions = []
    for s in range(shards):
        with wds.TarWriter(str(train / f"shard-{s:06d}.tar")) as w:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
                caption = " ".join(random.Random(s * per_shard + i).choices(words, k=5))
                captions.append(caption)
                w.write({"__key__": f"{s:06d}{i:06d}", "jpg": buf.getvalue(), "txt": caption,
                         "json": {"uid": f"{s:06d}{i:06d}"}})
    write_index(train)  # manifest.json and every shard's sample index
    train_tokenizer(captions, root, vocab_size=64)
    return train


def first_batch_seconds(cfg: DataConfig, tokenizer: Tokenizer, fraction: float) -> float:
    """Seconds to the first batch of a loader resumed at ``fraction`` of the epoch (0: fresh)."""
    loader = TrainLoader(cfg, 32, tokenizer, rank=0, world_size=1)
    if fraction:
        per_consumer = loader.manifest.total_samples // loader.consumers
        offset = int(fraction * per_consumer)
        loader.load_state_dict({"version": 2, "consumers": loader.consumers, "batches": 1, "corrupt": 0,
                                "cursors": {str(slot): [0, offset] for slot in range(loader.slots)}})
    t0 = time.perf_counter()
    loader.next()
    seconds = time.perf_counter() - t0
    loader.close()
    return seconds


def hide_indexes(train: Path) -> None:
    manifest = json.loads((train / "manifest.json").read_text())
    manifest.pop("index_suffix", None)
    (train / "manifest.json").write_text(json.dumps(manifest))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block", type=int, default=2000, help="data.shuffle_buffer: samples per shuffle block")
    p.add_argument("--repeats", type=int, default=3)
    a = smoke.parse_args(p, SMOKE, "seconds, checks the script works: 4 shards of 60 samples, 1 repeat", argv)
    with tempfile.TemporaryDirectory(prefix="resume_cost-") as tmp:
        t0 = time.perf_counter()
        train = write_dataset(Path(tmp), a.shards, a.per_shard)
        total = load_manifest(train).total_samples
        size_mb = sum(f.stat().st_size for f in train.glob("*.tar")) / 2**20
        print(f"dataset: {a.shards} shards x {a.per_shard} samples ({total} samples, {size_mb:.0f} MiB), written in "
              f"{time.perf_counter() - t0:.1f} s | loader: {WORKERS} workers, batch {a.batch_size}, blocks of {a.block}",
              flush=True)
        tokenizer = Tokenizer(Path(tmp) / "tokenizer.model", 16)
        cfg = DataConfig(root=tmp, train=str(train), tokenizer=str(Path(tmp) / "tokenizer.model"),
                         batch_size=a.batch_size, num_workers=WORKERS, shuffle_buffer=a.block)
        rows: dict[str, dict[float, float]] = {}
        for name in ("indexed", "no index"):
            if name == "no index":
                hide_indexes(train)
            rows[name] = {f: statistics.median(first_batch_seconds(cfg, tokenizer, f) for _ in range(a.repeats))
                          for f in (0.0, *FRACTIONS)}
            print(f"  {name}: " + ", ".join(f"{f:.0%} {s:.3f} s" for f, s in rows[name].items()), flush=True)
    fresh = rows["indexed"][0.0]
    print(f"\n{'data position':<16} {'indexed s':>10} {'x fresh':>8} {'no index s':>11} {'x fresh':>8}")
    for f in (0.0, *FRACTIONS):
        label = "fresh start" if f == 0 else f"resume at {f:.0%}"
        i, n = rows["indexed"][f], rows["no index"][f]
        print(f"{label:<16} {i:>10.3f} {i / fresh:>8.2f} {n:>11.3f} {n / rows['no index'][0.0]:>8.2f}")
    print(f"resume_vs_fresh_max: {max(rows['indexed'][f] for f in FRACTIONS) / fresh:.2f}")


if __name__ == "__main__":
    sys.exit(main())
