"""The training stream: balance across ranks x workers, exact resume, corrupt data, clear errors.

Runs on a small dataset built from the real Debian data (tests/conftest.py: ``small_build``).
"""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.atomic import sha256_file
from data_prep.manifest import Manifest, ManifestError, ShardInfo, load_manifest
from pretrain.config import DataConfig
from pretrain.data import TrainLoader, Tokenizer, image_transform
from pretrain.data.shard_samples import read_tar
from pretrain.data.stream import ShardStream, consumer_ranges
from pretrain.data.tokenizer import EOS_ID

IMAGE_SIZE, CONTEXT = 32, 16


def test_consumer_ranges_are_equal_disjoint_and_cover_the_epoch() -> None:
    counts = [5, 3, 0, 7, 1]  # 16 samples over shards of uneven sizes, one empty
    for consumers in (1, 2, 3, 5, 16):
        per = sum(counts) // consumers
        seen: list[tuple[int, int]] = []
        for c in range(consumers):
            ranges = consumer_ranges(counts, c, consumers)
            assert sum(stop - start for _, start, stop in ranges) == per
            seen += [(shard, i) for shard, start, stop in ranges for i in range(start, stop)]
        assert len(seen) == len(set(seen)) == per * consumers


def test_fewer_shards_than_consumers_still_balances() -> None:
    """One shard, four consumers: each reads its quarter, starting mid-shard."""
    assert [consumer_ranges([10], c, 4) for c in range(4)] == [[(0, 0, 2)], [(0, 2, 4)], [(0, 4, 6)], [(0, 6, 8)]]


def make_stream(manifest: Manifest, tokenizer: Tokenizer, rank: int, world: int, workers: int, **kw) -> ShardStream:
    return ShardStream(manifest, tokenizer, image_transform(IMAGE_SIZE), kw.pop("batch_size", 8), rank, world, workers,
                       seed=0, shuffle_buffer=kw.pop("shuffle_buffer", 50), **kw)


@pytest.fixture(scope="module")
def tokenizer(small_build) -> Tokenizer:
    return Tokenizer(small_build.tokenizer_path, CONTEXT)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1)])
def test_each_epoch_reads_every_sample_once_across_ranks_and_workers(small_build, tokenizer, world, workers) -> None:
    manifest = small_build.manifests["train"]
    consumers = world * workers
    per = manifest.total_samples // consumers
    epochs = []
    for epoch in range(2):
        keys: Counter = Counter()
        for rank in range(world):
            stream = make_stream(manifest, tokenizer, rank, world, workers)
            for slot in range(workers):
                got = [s["__key__"] for s in stream.raw_epoch(rank * workers + slot, epoch, pytest.fail)]
                assert len(got) == per, "every consumer gets the same number of samples"
                keys.update(got)
        assert max(keys.values()) == 1 and len(keys) == per * consumers
        epochs.append(keys)
    assert epochs[0].keys() != epochs[1].keys() or manifest.total_samples % consumers == 0


def test_single_shard_with_more_consumers_than_shards(small_build, tokenizer, tmp_path) -> None:
    one = small_build.manifests["train"].shards[0]
    manifest = Manifest(shards=[one], root=small_build.manifests["train"].root)
    batches = [next(iter(make_stream(manifest, tokenizer, r, 2, 2, batch_size=4, slot_offset=s)))
               for r in range(2) for s in range(2)]
    assert all(b["images"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) for b in batches)


def loader(path: Path, tokenizer: Tokenizer, workers: int, rank: int = 0, world: int = 1) -> TrainLoader:
    cfg = DataConfig(root=str(path.parent), train=str(path), tokenizer=tokenizer.model_path,
                     batch_size=8, num_workers=workers, shuffle_buffer=50)
    return TrainLoader(cfg, IMAGE_SIZE, tokenizer, rank, world)


def test_batches_have_images_and_eos_terminated_tokens(small_build, tokenizer) -> None:
    batch = loader(small_build.out_dir / "train", tokenizer, workers=0).next()
    assert batch["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == torch.float32
    assert batch["tokens"].shape == (8, CONTEXT)
    assert ((batch["tokens"] == EOS_ID).sum(dim=1) == 1).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(small_build, tokenizer, workers) -> None:
    """Stop after 3 batches, restore the state in a fresh loader: the next batches are identical to
    those of an uninterrupted loader, across an epoch boundary (443 samples / 8 per batch)."""
    train = small_build.out_dir / "train"
    straight = loader(train, tokenizer, workers, rank=1, world=2)  # rank 1 of 2: half the data
    first = [straight.next() for _ in range(3)]
    state = json.loads(json.dumps(straight.state_dict()))  # survives serialisation
    rest = [straight.next() for _ in range(30)]
    assert straight.epoch > 1, "the comparison must cross an epoch boundary"

    resumed = loader(train, tokenizer, workers, rank=1, world=2)
    resumed.load_state_dict(state)
    for i, expected in enumerate(rest):
        got = resumed.next()
        assert torch.equal(got["images"], expected["images"]) and torch.equal(got["tokens"], expected["tokens"]), f"batch {i}"
    assert not torch.equal(first[0]["images"], rest[0]["images"])
    straight.close()
    resumed.close()


def test_resume_deep_in_an_epoch_seeks_instead_of_rereading_it(small_build, tokenizer, tmp_path, monkeypatch, caplog) -> None:
    """Resuming near the end of an epoch parses one shuffle block from a seek (the shard's sample
    index), not the samples before it; with indexes that do not match their shards it warns, reads
    those shards from their start and still resumes exactly."""
    from pretrain.data import shard_samples

    parsed: list[int] = []
    real = shard_samples.iter_tar_samples

    def counting(f, url):  # noqa: ANN001, ANN202
        for sample in real(f, url):
            parsed.append(1)
            yield sample

    monkeypatch.setattr(shard_samples, "iter_tar_samples", counting)
    train = tmp_path / "train"
    shutil.copytree(small_build.out_dir / "train", train)
    straight = loader(train, tokenizer, workers=0)
    per_epoch = load_manifest(train).total_samples // 8
    for _ in range(per_epoch - 4):
        straight.next()
    state = json.loads(json.dumps(straight.state_dict()))
    expected = [straight.next()["uids"] for _ in range(3)]
    for damaged in (False, True):
        if damaged:  # every index off by one tar block: each seek lands inside a member's data
            for idx in train.glob("*.idx"):
                data = bytearray(idx.read_bytes())
                offsets = np.frombuffer(bytes(data[16:]), dtype="<u8").copy()
                offsets[:-1] += 512
                idx.write_bytes(bytes(data[:16]) + offsets.tobytes())
        parsed.clear()
        resumed = loader(train, tokenizer, workers=0)
        resumed.load_state_dict(state)
        assert [resumed.next()["uids"] for _ in range(3)] == expected
        if not damaged:  # one block of 50 from the seek, then at most 2 more for the 3 batches (a replay: ~the epoch)
            assert len(parsed) <= 3 * 50, f"parsed {len(parsed)} samples to resume at batch {per_epoch - 4}"
    assert "does not match" in caplog.text


def test_resume_with_other_worker_count_is_refused(small_build, tokenizer) -> None:
    train = small_build.out_dir / "train"
    a = loader(train, tokenizer, workers=0)
    a.next()
    with pytest.raises(ValueError, match="data.num_workers"):
        loader(train, tokenizer, workers=2).load_state_dict(a.state_dict())


def write_damaged_shards(src: Manifest, out: Path) -> Manifest:
    """Real samples re-written with damage: a truncated image, an empty caption, a non-UTF-8
    caption and a missing image; plus a second shard cut off mid-file."""
    samples = [s for shard in src.shards for s in read_tar(str(src.shard_path(shard)), 0, shard.samples, pytest.fail)][:60]
    damage = {
        0: lambda s: {**s, "png": s["png"][: len(s["png"]) // 2]},
        1: lambda s: {**s, "txt": b"   "},
        2: lambda s: {**s, "txt": b"\xff\xfe caption"},
        3: lambda s: {k: v for k, v in s.items() if k != "png"},
    }
    out.mkdir()
    infos = []
    for name, part in (("a.tar", samples[:30]), ("b.tar", samples[30:])):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as w:
            for i, s in enumerate(part):
                s = damage.get(i, lambda x: x)(s) if name == "a.tar" else s
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        data = buf.getvalue()
        if name == "b.tar":
            data = data[: len(data) // 2]  # truncated: the download or copy was cut short
        (out / name).write_bytes(data)
        infos.append(ShardInfo(name, len(part), len(data), sha256_file(out / name)))
    manifest = Manifest(shards=infos, root=out)
    manifest.save()
    return manifest


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(small_build, tokenizer, tmp_path, caplog) -> None:
    write_damaged_shards(small_build.manifests["train"], tmp_path / "damaged")
    stream = loader(tmp_path / "damaged", tokenizer, workers=0)
    batches = [stream.next() for _ in range(12)]  # > 2 epochs of the ~45 readable samples
    assert all(b["images"].shape[0] == 8 for b in batches)
    assert stream.corrupt >= 8, "4 damaged samples per epoch, counted"
    log = caplog.text
    for reason in ("image is corrupt", "caption is empty", "not UTF-8", "has no image", "truncated or unreadable"):
        assert reason in log, f"no log line for: {reason}"


def test_missing_dataset_path_is_named(tokenizer, tmp_path) -> None:
    with pytest.raises(ManifestError, match=str(tmp_path / "nope")):
        loader(tmp_path / "nope", tokenizer, workers=0)


def test_empty_manifest_is_named(tokenizer, tmp_path) -> None:
    Manifest(shards=[], root=tmp_path).save()
    with pytest.raises(ManifestError, match=f"{tmp_path}.*no samples"):
        load_manifest(tmp_path)
