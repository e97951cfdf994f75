"""SIGKILL of one rank at a random step of a real 2-rank torchrun run with ``--max-restarts``: torchrun
restarts both ranks, they resume from the last complete checkpoint, the job ends normally, and the
per-rank uid logs (``data.log_uids``) show every sample of the epoch trained exactly once.

The random choices (which rank, which step) come from a seed printed by the test; ``CHAOS_SEED=N``
replays them.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from data_prep.manifest import Manifest, load_manifest
from launch.local import rank_env, torchrun_command
from pretrain.data.stream import shard_order
from tests.chaos.train_runs import RANKS, overrides, uid_rows
from tests.pretrain.test_preemption import rank_pids

DATA_SEED = 0  # data.seed's default: it orders the shards of each epoch


def shard_uids(path: Path) -> list[str]:
    """The uids of one shard's samples, in file order (from each sample's json metadata)."""
    with tarfile.open(path) as tar:
        return [json.load(tar.extractfile(m))["uid"] for m in tar.getmembers() if m.name.endswith(".json")]


def first_epoch(manifest: Manifest, consumers: int) -> tuple[list[str], list[str]]:
    """(trained, dropped) uids of epoch 0 as pretrain/data/stream.py documents it: the shards in the
    epoch's seeded order, end to end, cut into ``consumers`` equal ranges; the < consumers samples
    left over at the end are skipped that epoch."""
    order = shard_order(len(manifest.shards), DATA_SEED, 0)
    samples = [uid for i in order for uid in shard_uids(manifest.shard_path(manifest.shards[i]))]
    kept = len(samples) // consumers * consumers
    return samples[:kept], samples[kept:]


def batch_size_for(per_rank: int) -> int:
    """A batch size that divides a rank's share, so whole steps make exactly one epoch (a batch
    that crossed the epoch's end would take samples of the next epoch)."""
    sizes = [b for b in range(32, 7, -1) if per_rank % b == 0]
    assert sizes, f"no batch size in [8, 32] divides {per_rank} samples per rank: change the test dataset's size"
    return sizes[0]


def test_sigkill_of_a_rank_restarts_and_every_sample_of_the_epoch_trains_once(small_build, tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} replays this run's choices)")
    rng = random.Random(seed)

    manifest = load_manifest(small_build.out_dir / "train")
    trained, dropped = first_epoch(manifest, RANKS)  # one loader worker per rank: one consumer per rank
    per_rank = len(trained) // RANKS
    batch = batch_size_for(per_rank)
    steps, every = per_rank // batch, 4
    victim, kill_at = rng.randrange(RANKS), rng.randint(every + 1, steps - 1)
    print(f"{steps} steps of {RANKS} x {batch} samples, checkpoint every {every}; SIGKILL rank {victim} after step {kill_at}")

    run = tmp_path / "run"
    cmd = torchrun_command(RANKS, overrides(run, small_build.out_dir, f"steps={steps}", f"checkpoint.every={every}",
                                            "checkpoint.keep=20", "data.num_workers=1", "data.log_uids=true",
                                            batch_size=batch), max_restarts=1)
    log = tmp_path / "out.log"
    with open(log, "w") as sink, subprocess.Popen(cmd, env=rank_env(RANKS), stdout=sink, stderr=subprocess.STDOUT) as proc:
        deadline = time.monotonic() + 180
        while not any(r["step"] >= kill_at for r in uid_rows(run, victim)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        os.kill(rank_pids(proc)[victim], signal.SIGKILL)
        killed_after = max(r["step"] for r in uid_rows(run, victim))
        proc.wait(timeout=240)
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert killed_after < steps, "the kill must land mid-training"
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert len(resumed) == 1 and resumed[0] % every == 0 and every <= resumed[0] <= killed_after, (resumed, killed_after)
    assert json.loads((run / "summary.json").read_text())["steps"] == steps

    seen: list[str] = []
    for rank in range(RANKS):
        rows = uid_rows(run, rank)
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), f"rank {rank}: each step logged once"
        assert all(len(r["uids"]) == batch and not r.get("skipped") for r in rows)
        seen += [uid for r in rows for uid in r["uids"]]
    assert len(seen) == len(set(seen)), "a sample was trained twice"
    assert set(seen) == set(trained), f"lost: {sorted(set(trained) - set(seen))[:5]}"
    assert len(dropped) == manifest.total_samples % RANKS and not set(dropped) & set(seen)
