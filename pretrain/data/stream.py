"""A balanced, resumable stream of training batches read from WebDataset shards.

Balance. Each epoch the shards are put in a seeded random order and their samples, end to end, form
one sequence that is cut into C = world_size x workers contiguous ranges of equal length (the < C
samples left over are skipped that epoch; the order changes every epoch, so not always the same
ones). Consumer c reads only the shards overlapping its range, starting mid-shard if needed. Every
consumer thus gets exactly the same number of samples per epoch whatever the shard count (fewer
shards than consumers included), and streams are endless (epoch follows epoch), so no rank ever
waits for another or runs out of batches mid-step.

Damaged data. When the stream is built, every shard whose file is missing or whose size differs from
the manifest's (truncated, replaced, a failed copy) is left out of the plan with a warning naming it;
every rank sees the same files, so all agree on the plan and balance stays exact. Damage the size
check cannot see (same-size garbage, corrupt samples) is found while reading: those samples are
skipped, logged (capped) and counted in each batch's ``corrupt``; the consumer that met them yields
fewer samples that epoch, but streams are endless, so ranks still never wait on each other. Shard
bytes are parsed by :mod:`pretrain.data.shard_samples`, which never unpickles anything.

Position. Consumer c's stream is a pure function of (seed, epoch, c): its position is a
:class:`Cursor` (epoch, samples emitted that epoch, corrupt ones included). Resuming replays that
epoch's raw stream to the cursor without decoding any image, then continues: the batches after a
resume are the batches an uninterrupted run would have produced.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_prep.manifest import Manifest, ShardInfo
from pretrain.data.shard_samples import parse_sample, read_tar
from pretrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ShardErrorSink = Callable[[str, int], None]  # (message naming the shard, samples of its range lost)

__all__ = ["Cursor", "ShardStream", "check_shards", "consumer_ranges"]

MAX_LOGGED_ERRORS = 20  # per consumer and kind: enough to diagnose, not enough to flood a long run's log
# A consumer whose range lay inside one bad shard may read nothing one epoch (the order changes every
# epoch); nothing usable this many epochs in a row means the data is broken: fail rather than spin.
MAX_EMPTY_EPOCHS = 3


@dataclass
class Cursor:
    epoch: int = 0
    offset: int = 0  # raw samples emitted in `epoch`, kept or corrupt


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_shards, generator=g).tolist()


def consumer_ranges(counts: list[int], consumer: int, consumers: int) -> list[tuple[int, int, int]]:
    """Slices (position in ``counts``, start, stop) covering consumer's equal share of the
    concatenated samples; ``counts`` are per-shard sample counts in this epoch's order."""
    per = sum(counts) // consumers
    lo, hi = consumer * per, (consumer + 1) * per
    out, begin = [], 0
    for i, n in enumerate(counts):
        end = begin + n
        if n and end > lo and begin < hi:  # an empty shard is never opened
            out.append((i, max(lo, begin) - begin, min(hi, end) - begin))
        begin = end
    return out


def buffered_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (``size`` <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def check_shards(manifest: Manifest) -> tuple[list[ShardInfo], list[str]]:
    """The shards worth reading (file present, size as listed), and one message per shard left out.

    A stat per shard, not a sha256: hashing every shard on every rank at every start would cost a
    full read of the dataset; same-size damage is caught while reading instead."""
    usable: list[ShardInfo] = []
    problems: list[str] = []
    for shard in manifest.shards:
        if shard.samples == 0:
            continue  # an empty shard is valid and holds nothing to read
        path = manifest.shard_path(shard)
        try:
            size = path.stat().st_size
        except OSError as e:
            problems.append(f"shard {path} is listed in the manifest but cannot be read ({e.strerror}): its "
                            f"{shard.samples} samples are skipped; restore the file or rebuild the manifest")
            continue
        if size != shard.bytes:
            problems.append(f"shard {path} has {size} bytes but the manifest lists {shard.bytes} (truncated or "
                            f"replaced since it was written?): its {shard.samples} samples are skipped; re-copy "
                            f"the shard, or re-index the folder with `python -m data_prep index --force`")
            continue
        usable.append(shard)
    return usable, problems


class ShardStream(IterableDataset):
    """Endless batches for one rank; with DataLoader workers, each worker is one consumer slot.

    ``slot_offset`` rotates worker ids onto slots so that after a resume the DataLoader's first
    worker serves the slot whose batch is next (DataLoader takes batches from workers round-robin).
    Shards are checked once here, in the rank's main process, so its workers share one plan.
    """

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, rank: int, world_size: int, workers: int, seed: int, shuffle_buffer: int,
                 cursors: Optional[dict[int, Cursor]] = None, slot_offset: int = 0) -> None:
        self.manifest, self.tokenizer, self.transform = manifest, tokenizer, transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers, self.seed, self.shuffle_buffer = max(1, workers), seed, shuffle_buffer
        self.cursors = dict(cursors or {})
        self.slot_offset = slot_offset
        self.shards, self.skipped_shards = check_shards(manifest)
        for problem in self.skipped_shards:
            log.warning("data: %s", problem)
        usable = sum(s.samples for s in self.shards)
        if usable < self.consumers:
            raise ValueError(
                f"dataset {manifest.root} has {usable} samples in readable shards ({len(self.skipped_shards)} of "
                f"{len(manifest.shards)} shards skipped, see the warnings above), fewer than ranks x workers = "
                f"{self.consumers}: repair the shards, lower data.num_workers, or use more data"
            )

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.slot_offset) % self.workers
        return self._batches(slot, self.cursors.get(slot, Cursor()))

    def raw_epoch(self, consumer: int, epoch: int, on_error: ShardErrorSink) -> Iterator[dict[str, Any]]:
        """Consumer's raw samples of one epoch, shuffled; deterministic in (seed, epoch, consumer)."""
        shards = self.shards
        order = shard_order(len(shards), self.seed, epoch)
        ranges = consumer_ranges([shards[i].samples for i in order], consumer, self.consumers)

        def read() -> Iterator[dict[str, Any]]:
            for pos, start, stop in ranges:
                problems: list[str] = []
                got = 0
                for sample in read_tar(str(self.manifest.shard_path(shards[order[pos]])), start, stop, problems.append):
                    got += 1
                    yield sample
                if problems:  # read_tar reports once, when the shard ends early
                    on_error("; ".join(problems), stop - start - got)

        rng = random.Random(f"{self.seed}/{epoch}/{consumer}")
        return buffered_shuffle(read(), self.shuffle_buffer, rng)

    def _batches(self, slot: int, cursor: Cursor) -> Iterator[dict[str, Any]]:
        consumer = self.rank * self.workers + slot
        lost = 0  # samples skipped since the last batch: corrupt ones and those of unreadable shard ranges
        logged = {"sample": 0, "shard": 0}
        replay_until = received = 0  # resuming: raw samples to replay undecoded / raw samples received

        def report(kind: str, message: str) -> None:
            logged[kind] += 1
            if logged[kind] <= MAX_LOGGED_ERRORS:
                log.warning("data: consumer %d skipped %s", consumer, message)
            if logged[kind] == MAX_LOGGED_ERRORS:
                log.warning("data: consumer %d logs no more %s errors; data/corrupt_samples still counts them",
                            consumer, kind)

        def on_shard_error(message: str, samples: int) -> None:
            nonlocal lost
            # Met before the resume cursor: the run that saved the cursor counted these already.
            if received >= replay_until:
                lost += samples
            report("shard", f"{samples} sample(s): {message}")

        images: list[torch.Tensor] = []
        captions: list[str] = []
        uids: list[str] = []
        cursor = Cursor(cursor.epoch, cursor.offset)
        empty_epochs = 0
        while True:
            replay_until, received, good = cursor.offset, 0, 0
            for raw in self.raw_epoch(consumer, cursor.epoch, on_shard_error):
                received += 1
                if received <= replay_until:  # resuming: replay without decoding
                    continue
                cursor.offset += 1
                try:
                    image, caption, uid = parse_sample(raw, self.transform)
                except ValueError as e:
                    lost += 1
                    report("sample", str(e))
                    continue
                good += 1
                images.append(image)
                captions.append(caption)
                uids.append(uid)
                if len(images) == self.batch_size:
                    yield {
                        "images": torch.stack(images),  # (B, 3, H, W)
                        "tokens": self.tokenizer(captions),  # (B, L)
                        "uids": uids,  # B sample uids, for logs and data-order checks
                        "slot": slot,
                        "cursor": (cursor.epoch, cursor.offset),
                        "corrupt": lost,
                    }
                    images, captions, uids, lost = [], [], [], 0
            empty_epochs = empty_epochs + 1 if replay_until == 0 and good == 0 else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(
                    f"data: consumer {consumer} read no usable sample in {empty_epochs} epochs in a row of "
                    f"{self.manifest.root}: its shards are unreadable or every sample is corrupt (see the "
                    f"warnings above); repair or re-index the shards"
                )
            cursor = Cursor(cursor.epoch + 1, 0)
