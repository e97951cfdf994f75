"""Damage the loader's start-up size check cannot see, and datasets with nothing usable left.

Same-size rot (a shard overwritten in place) is found while reading: its samples are skipped,
counted in ``corrupt`` and the shard is named in a warning, and batches keep coming. A dataset
whose every shard is bad fails with an error naming the problem, never hangs or spins.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pretrain.config import DataConfig
from pretrain.data import TrainLoader, Tokenizer
from pretrain.data.stream import MAX_EMPTY_EPOCHS
from tests.chaos.tar_kit import copy_dataset

IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 8


@pytest.fixture(scope="module")
def tokenizer(small_build) -> Tokenizer:
    return Tokenizer(small_build.tokenizer_path, CONTEXT)


def make_loader(data: Path, tokenizer: Tokenizer, workers: int) -> TrainLoader:
    cfg = DataConfig(root=str(data), train=str(data), tokenizer=tokenizer.model_path, batch_size=BATCH,
                     num_workers=workers, shuffle_buffer=20)
    return TrainLoader(cfg, IMAGE_SIZE, tokenizer, rank=0, world_size=1)


def rot(path: Path, seed: int) -> None:
    """Overwrite a file in place with garbage of the same size (bit rot, a bad disk, a botched sync)."""
    path.write_bytes(random.Random(seed).randbytes(path.stat().st_size))


def test_same_size_rot_is_skipped_counted_and_named(small_build, tokenizer, tmp_path, caplog) -> None:
    manifest = copy_dataset(small_build.out_dir / "train", tmp_path / "train")
    bad = manifest.shards[1]
    rot(manifest.shard_path(bad), seed=1)
    loader = make_loader(manifest.root, tokenizer, workers=0)  # one consumer: it reads every shard
    epochs = 3
    batches = [loader.next() for _ in range(epochs * (manifest.total_samples - bad.samples) // BATCH)]
    assert all(len(b["uids"]) == BATCH for b in batches)
    assert loader.epoch >= epochs - 1
    # Each epoch loses the rotten shard's samples; the last epoch is not finished.
    assert (epochs - 1) * bad.samples <= loader.corrupt <= epochs * bad.samples
    assert f"{bad.name} is truncated or unreadable" in caplog.text


def test_same_size_rot_with_workers_keeps_the_rank_fed(small_build, tokenizer, tmp_path) -> None:
    """Two workers, one of which meets the rotten shard: the rank still gets every batch it asks for."""
    manifest = copy_dataset(small_build.out_dir / "train", tmp_path / "train")
    rot(manifest.shard_path(manifest.shards[0]), seed=2)
    loader = make_loader(manifest.root, tokenizer, workers=2)
    batches = [loader.next() for _ in range(3 * (manifest.total_samples - manifest.shards[0].samples) // BATCH)]
    assert len(batches) and all(b["images"].shape[0] == BATCH for b in batches)
    assert loader.corrupt >= manifest.shards[0].samples - 1
    loader.close()


def test_every_shard_the_wrong_size_fails_at_start_naming_them(small_build, tokenizer, tmp_path) -> None:
    manifest = copy_dataset(small_build.out_dir / "train", tmp_path / "train")
    for shard in manifest.shards:
        manifest.shard_path(shard).write_bytes(b"")
    n = len(manifest.shards)
    with pytest.raises(ValueError, match=rf"0 samples in readable shards \({n} of {n} shards skipped"):
        make_loader(manifest.root, tokenizer, workers=0).next()


def test_every_shard_rotten_fails_after_a_few_epochs_instead_of_spinning(small_build, tokenizer, tmp_path) -> None:
    manifest = copy_dataset(small_build.out_dir / "train", tmp_path / "train")
    for i, shard in enumerate(manifest.shards):
        rot(manifest.shard_path(shard), seed=10 + i)
    with pytest.raises(RuntimeError, match=f"no usable sample in {MAX_EMPTY_EPOCHS} epochs in a row"):
        make_loader(manifest.root, tokenizer, workers=0).next()


def test_resume_counts_damage_once(small_build, tokenizer, tmp_path) -> None:
    """Samples lost before a checkpoint's cursor were counted by the run that saved it: after a
    resume, batches and the ``corrupt`` count match the uninterrupted loader's, over > 1 epoch."""
    manifest = copy_dataset(small_build.out_dir / "train", tmp_path / "train")
    rot(manifest.shard_path(manifest.shards[2]), seed=3)
    probe = make_loader(manifest.root, tokenizer, workers=0)
    while probe.corrupt == 0:
        probe.next()
    first_hit = probe.batches  # the batch that carries the rotten shard's count
    # The shuffle buffer reads ahead, so the damage is met before first_hit's cursor: a resume from
    # there replays past it (must not count it again); one from the batch before must count it.
    for stop in (first_hit - 1, first_hit):
        straight = make_loader(manifest.root, tokenizer, workers=0)
        for _ in range(stop):
            straight.next()
        resumed = make_loader(manifest.root, tokenizer, workers=0)
        resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
        for i in range(45):  # > 1 epoch of the ~340 readable samples
            assert resumed.next()["uids"] == straight.next()["uids"], f"checkpoint at batch {stop}, batch {i}"
        assert resumed.corrupt == straight.corrupt, f"checkpoint at batch {stop}"
