"""Soak: 2 gloo ranks x 2 loader workers stream a real dataset with damaged shards mixed in, for
several epochs, through the trainer's own loader (``TrainLoader``).

The damage: one shard overwritten with garbage, one truncated mid-file (both no longer match the
manifest's size), a valid tar holding 0 samples and a 0-byte file listed with 0 samples. Checked:
no hang (every step runs a collective; the whole run has a deadline), every rank and every worker
yields the same number of samples per epoch, each epoch every sample of the intact shards is seen
at most once and all but the < ranks x workers left over are seen, the bad shards are named in a
warning on every rank, and the memory of each rank's process tree stays flat after the first epoch.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.local import free_port
from pretrain.config import DataConfig
from pretrain.data import TrainLoader, Tokenizer
from tests.chaos.tar_kit import add_shard, copy_dataset, shard_uids, tar_bytes

WORLD, WORKERS, EPOCHS = 2, 2, 4
IMAGE_SIZE, CONTEXT, BATCH, SHUFFLE = 32, 16, 8, 20
DEADLINE_S = 150  # a hang detector for the whole soak, which takes ~35 s on 2 busy cores
MAX_RSS_GROWTH = 48 << 20  # per rank's process tree (rank + 2 workers), from epoch 1 to the last


def tree_rss() -> int:
    """Resident bytes of this process and its children (the loader's workers)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that just exited
            pass
    return total


def _rank_main(rank: int, port: int, data: str, tokenizer_path: str, out: str, per_consumer: int) -> None:
    """One rank: stream EPOCHS epochs, one collective per step; results to ``out/rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # Forked loader workers inherit the handler, so their read-time warnings land in the file too.
    handler = logging.FileHandler(Path(out) / f"rank{rank}.log")
    logging.getLogger("pretrain.data").addHandler(handler)
    logging.getLogger("pretrain.data").setLevel(logging.WARNING)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    tokenizer = Tokenizer(tokenizer_path, CONTEXT)
    cfg = DataConfig(root=data, train=data, tokenizer=tokenizer_path, batch_size=BATCH, num_workers=WORKERS,
                     shuffle_buffer=SHUFFLE)
    loader = TrainLoader(cfg, IMAGE_SIZE, tokenizer, rank, WORLD)
    # A fresh loader takes batch i from worker slot i % WORKERS (the DataLoader's round robin).
    per_slot: list[list[str]] = [[] for _ in range(WORKERS)]
    rss: list[int] = []
    steps = 0
    while len(rss) < EPOCHS:
        batch = loader.next()
        assert batch["images"].shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        dist.all_gather(sizes, torch.tensor([len(batch["uids"])]))  # what a training step's all-gather does
        assert [int(s) for s in sizes] == [BATCH] * WORLD
        per_slot[steps % WORKERS] += batch["uids"]
        steps += 1
        if min(len(u) for u in per_slot) >= (len(rss) + 1) * per_consumer:  # every slot finished an epoch
            rss.append(tree_rss())
    result = {"per_slot": per_slot, "rss": rss, "steps": steps, "corrupt": loader.corrupt}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    loader.close()
    dist.destroy_process_group()


def damage(train: Path, tmp: Path) -> tuple[Path, list[str], list[str]]:
    """A copy of ``train`` with two shards damaged and two empty ones added: (folder, intact, damaged)."""
    manifest = copy_dataset(train, tmp / "train")
    names = [s.name for s in manifest.shards]
    assert len(names) >= 4, "the small build should have several shards"
    garbage, truncated = names[1], names[3]
    (manifest.root / garbage).write_bytes(random.Random(7).randbytes(5000))  # overwritten by junk
    path = manifest.root / truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy
    add_shard(manifest, "shard-empty.tar", tar_bytes([]), samples=0)  # a valid tar with no sample
    add_shard(manifest, "shard-zero.tar", b"", samples=0)  # 0 bytes, listed as holding nothing
    return manifest.root, [n for n in names if n not in (garbage, truncated)], [garbage, truncated]


def test_two_ranks_two_workers_soak_damaged_shards(small_build, tmp_path: Path) -> None:
    data, intact, damaged = damage(small_build.out_dir / "train", tmp_path)
    good = shard_uids(small_build.manifests["train"], intact)
    consumers = WORLD * WORKERS
    per_consumer = len(good) // consumers
    out = tmp_path / "ranks"
    out.mkdir()

    t0 = time.monotonic()
    ctx = mp.start_processes(_rank_main, nprocs=WORLD, join=False, start_method="spawn",
                             args=(free_port(), str(data), str(small_build.tokenizer_path), str(out), per_consumer))
    while not ctx.join(timeout=1):
        if time.monotonic() - t0 > DEADLINE_S:
            for p in ctx.processes:
                p.kill()  # their workers exit when they see the parent gone
            pytest.fail(f"the soak hung: not done after {DEADLINE_S} s")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    logs = [(out / f"rank{r}.log").read_text() for r in range(WORLD)]

    assert len({r["steps"] for r in ranks}) == 1, "ranks took different numbers of steps"
    for epoch in range(EPOCHS):
        seen: list[str] = []
        for r in ranks:
            rank_epoch = [u for slot in r["per_slot"] for u in slot[epoch * per_consumer:(epoch + 1) * per_consumer]]
            assert len(rank_epoch) == WORKERS * per_consumer, "every rank yields the same samples per epoch"
            seen += rank_epoch
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample came twice"
        assert set(seen) <= good, f"epoch {epoch}: samples from outside the intact shards"
        assert len(seen) >= len(good) - (consumers - 1), f"epoch {epoch}: samples missing"
    for log in logs:
        for name in damaged:
            assert f"{name} has" in log and "manifest lists" in log, f"no warning names {name}:\n{log}"
        assert "shard-empty" not in log and "shard-zero" not in log, "an empty shard is not an error"
    assert [r["corrupt"] for r in ranks] == [0, 0], "bad shards are left out of the plan, never half-read"

    mib = [[round(b / 2**20, 1) for b in r["rss"]] for r in ranks]
    print(f"soak: {ranks[0]['steps']} steps/rank in {time.monotonic() - t0:.1f} s; "
          f"RSS per epoch (MiB, rank + workers): {mib}")
    for r, values in enumerate(ranks):
        growth = values["rss"][-1] - values["rss"][0]
        assert growth < MAX_RSS_GROWTH, f"rank {r} grew {growth / 2**20:.1f} MiB after epoch 1: {mib[r]}"
