"""A balanced, resumable stream of training batches read from WebDataset shards.

Balance. Each epoch the shards are put in a seeded random order and their samples, end to end, form
one sequence that is cut into C = world_size x workers contiguous ranges of equal length (the < C
samples left over are skipped that epoch; the order changes every epoch, so not always the same
ones). Consumer c reads only the shards overlapping its range, starting mid-shard if needed. Every
consumer thus gets exactly the same number of samples per epoch whatever the shard count (fewer
shards than consumers included), and streams are endless (epoch follows epoch), so no rank ever
waits for another or runs out of batches mid-step.

Damaged data. At start, one listing of the shards' folder (rank 0's, sent to every rank: a local
directory read, or one request per 1000 objects on S3/GCS, never a request per shard) leaves out of
the plan, with a warning naming it, every shard that is missing or whose size differs from the
manifest's (truncated, replaced, a failed copy); every rank gets the same plan, so balance stays
exact. Where a store cannot list (HTTP, ``pipe:``), sizes are checked as each shard opens, and a
missing or wrong-size shard is skipped and counted like a truncated one. Damage the size
check cannot see (same-size garbage, corrupt samples) is found while reading: those samples are
skipped, logged (capped) and counted in each batch's ``corrupt``; the consumer that met them yields
fewer samples that epoch, but streams are endless, so ranks still never wait on each other. Shard
bytes are parsed by :mod:`pretrain.data.shard_samples`, which never unpickles anything.

Position. Consumer c's stream is a pure function of (seed, epoch, c). Its samples are shuffled in
blocks of ``shuffle_buffer`` consecutive positions, each block by a generator seeded with its own
index, so the position is a :class:`Cursor` (epoch, offset = block x S + outputs of that block
taken, corrupt ones included) and a resume is a seek: it reads the one block under the cursor,
starting mid-shard through the shards' sample offset index (``data_prep/sample_index.py``; without
one, from the start of that shard), never the epoch before it. Its cost does not grow with the
position in the epoch, and the batches after a resume are those an uninterrupted run produces.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_prep import sample_index, storage
from data_prep.manifest import Manifest, ShardInfo
from pretrain.data.shard_samples import parse_sample, read_tar, size_mismatch
from pretrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Cursor", "ShardPlan", "ShardStream", "check_shards", "consumer_ranges", "plan_shards"]

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


def check_shards(manifest: Manifest, sizes: Optional[dict[str, int]]) -> tuple[list[ShardInfo], list[str]]:
    """The shards worth reading (present, size as listed in ``sizes``: one listing of the folder),
    and one message per shard left out. ``sizes`` None (a store that cannot list: HTTP, pipe:):
    every shard is planned, and its size is checked when it opens (``read_tar``).

    A listing, not a stat or a sha256 per shard: at 100k shards per rank those would be 100k
    metadata requests per rank at every start, or a full read of the dataset."""
    usable: list[ShardInfo] = []
    problems: list[str] = []
    for shard in manifest.shards:
        if shard.samples == 0:
            continue  # an empty shard is valid and holds nothing to read
        # Not in a flat listing (no listing, or a name in a subfolder): checked when it opens instead.
        unlisted = sizes is None or "/" in shard.name
        size = shard.bytes if unlisted else sizes.get(shard.name)  # type: ignore[union-attr]
        if size == shard.bytes:
            usable.append(shard)
            continue
        where = storage.redact(manifest.shard_path(shard))
        if size is None:
            problems.append(f"shard {where} is listed in the manifest but missing: its {shard.samples} samples are "
                            "skipped; restore the file or rebuild the manifest")
        else:
            problems.append(f"{size_mismatch(where, size, shard.bytes)}: its {shard.samples} samples are skipped; "
                            "re-copy the shard, or re-index the folder with `python -m data_prep index --force`")
    return usable, problems


@dataclass
class ShardPlan:
    """What every rank reads from: the usable shards and why the others are left out."""

    shards: list[ShardInfo]
    problems: list[str]


def plan_shards(manifest: Manifest) -> ShardPlan:
    """Check the manifest's shards against one listing of their folder. In a distributed run rank 0
    lists and every rank receives its plan (so they agree, and a store sees shards/1000 requests
    per start, not that per rank); a failed listing raises the same error on every rank."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    outcome: list[Any] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            outcome[0] = ShardPlan(*check_shards(manifest, storage.list_sizes(manifest.root)))
        except OSError as e:
            outcome[0] = f"cannot list the shards of {storage.redact(manifest.root)}: {e}"
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise OSError(outcome[0])
    return outcome[0]


class ShardStream(IterableDataset):
    """Endless batches for one rank; with DataLoader workers, each worker is one consumer slot.

    ``slot_offset`` rotates worker ids onto slots so that after a resume the DataLoader's first
    worker serves the slot whose batch is next (DataLoader takes batches from workers round-robin).
    Shards are checked once here, in the rank's main process, so its workers share one plan.
    """

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, rank: int, world_size: int, workers: int, seed: int, shuffle_buffer: int,
                 cursors: Optional[dict[int, Cursor]] = None, slot_offset: int = 0, plan: Optional[ShardPlan] = None) -> None:
        self.manifest, self.tokenizer, self.transform = manifest, tokenizer, transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers, self.seed, self.shuffle_buffer = max(1, workers), seed, shuffle_buffer
        self.cursors = dict(cursors or {})
        self.slot_offset = slot_offset
        if plan is None:  # outside TrainLoader: this process's own listing, no collective
            plan = ShardPlan(*check_shards(manifest, storage.list_sizes(manifest.root)))
            for problem in plan.problems:
                log.warning("data: %s", problem)
        self.shards, self.skipped_shards = plan.shards, plan.problems
        usable = sum(s.samples for s in self.shards)
        if usable < self.consumers:
            raise ValueError(
                f"dataset {storage.redact(manifest.root)} has {usable} samples in readable shards ({len(self.skipped_shards)} of "
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

    @property
    def block(self) -> int:
        """Samples per shuffle block (``shuffle_buffer``; 1: no shuffle)."""
        return max(1, self.shuffle_buffer)

    def plan_epoch(self, consumer: int, epoch: int) -> list[tuple[ShardInfo, int, int]]:
        """Consumer's share of one epoch: (shard, start, stop) slices in reading order. Arithmetic on
        the plan only: no request to any store."""
        order = shard_order(len(self.shards), self.seed, epoch)
        ranges = consumer_ranges([self.shards[i].samples for i in order], consumer, self.consumers)
        return [(self.shards[order[pos]], start, stop) for pos, start, stop in ranges]

    def _seek(self, shard: ShardInfo, sample: int) -> Optional[int]:
        """Byte offset of ``sample`` in ``shard`` from its sample index; None (read from the start)
        when the dataset has no index or this one is unreadable or does not match."""
        if sample == 0 or not self.manifest.index_suffix:
            return None
        try:
            return sample_index.read_offsets(self.manifest.root, shard.name, shard.samples, shard.bytes)[sample]
        except (OSError, ValueError) as e:
            log.warning("data: %s; reading shard %s from its start instead", e, storage.redact(self.manifest.shard_path(shard)))
            return None

    def positioned(self, plan: list[tuple[ShardInfo, int, int]], on_error: Callable[[str], None],
                   start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, raw sample) of an epoch's ``plan`` (``plan_epoch``) from position ``start`` on,
        in reading order. A position indexes the planned samples, so samples a damaged shard does
        not give leave their positions unused. Starting mid-shard seeks there through the sample index."""
        pos = 0
        for shard, first, stop in plan:
            n = stop - first
            if pos + n <= start:
                pos += n
                continue
            skip = max(0, start - pos)
            loc = self.manifest.shard_path(shard)
            for i, sample in enumerate(read_tar(loc, first + skip, stop, on_error, shard.bytes, self._seek(shard, first + skip))):
                yield pos + skip + i, sample
            pos += n

    def blocks(self, consumer: int, epoch: int, on_error: Callable[[str], None],
               first_block: int = 0) -> Iterator[tuple[int, list[dict[str, Any]], int]]:
        """(block, its raw samples shuffled, samples of the block lost) from ``first_block`` on.

        Block b holds positions [b*S, (b+1)*S) (S = ``block``), shuffled by a generator seeded
        with (seed, epoch, consumer, b): a pure function of its position, so resuming at block b
        reads S samples from a seek, whatever the position in the epoch. Lost samples (positions a
        damaged shard did not give) are counted per block, including blocks nothing came from."""
        plan = self.plan_epoch(consumer, epoch)
        S, total = self.block, sum(stop - first for _, first, stop in plan)
        planned = lambda b: min(S, total - b * S)  # noqa: E731: positions of block b
        current, samples = first_block, []

        def done(b: int, items: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]], int]:
            random.Random(f"{self.seed}/{epoch}/{consumer}/{b}").shuffle(items)
            return b, items, planned(b) - len(items)

        for pos, sample in self.positioned(plan, on_error, first_block * S):
            b = pos // S
            while b != current:  # blocks before b are complete (empty ones included)
                yield done(current, samples)
                current, samples = current + 1, []
            samples.append(sample)
        while current * S < total:
            yield done(current, samples)
            current, samples = current + 1, []

    def raw_epoch(self, consumer: int, epoch: int, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
        """Consumer's raw samples of one epoch, shuffled; deterministic in (seed, epoch, consumer)."""
        for _, samples, _ in self.blocks(consumer, epoch, on_error):
            yield from samples

    def _batches(self, slot: int, cursor: Cursor) -> Iterator[dict[str, Any]]:
        consumer = self.rank * self.workers + slot
        lost = 0  # samples skipped since the last batch: corrupt ones and those of unreadable shard ranges
        logged = {"sample": 0, "shard": 0}

        def report(kind: str, message: str) -> None:
            logged[kind] += 1
            if logged[kind] <= MAX_LOGGED_ERRORS:
                log.warning("data: consumer %d skipped %s", consumer, message)
            if logged[kind] == MAX_LOGGED_ERRORS:
                log.warning("data: consumer %d logs no more %s errors; data/corrupt_samples still counts them",
                            consumer, kind)

        images: list[torch.Tensor] = []
        captions: list[str] = []
        uids: list[str] = []
        empty_epochs = 0
        S = self.block
        while True:
            # The cursor is (block, outputs of it taken). A block the checkpointed run had already
            # read (some of its outputs taken) had its lost samples counted then: not again.
            resume_block, taken = divmod(cursor.offset, S)
            good = 0
            for b, samples, missing in self.blocks(consumer, cursor.epoch, lambda m: report("shard", m), resume_block):
                if b > resume_block or taken == 0:
                    lost += missing
                for i, raw in enumerate(samples):
                    if b == resume_block and i < taken:
                        continue  # resuming: taken before the checkpoint, not decoded again
                    cursor = Cursor(cursor.epoch, b * S + i + 1)
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
            empty_epochs = empty_epochs + 1 if resume_block == 0 and taken == 0 and good == 0 else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(
                    f"data: consumer {consumer} read no usable sample in {empty_epochs} epochs in a row of "
                    f"{storage.redact(self.manifest.root)}: its shards are unreadable or every sample is corrupt "
                    "(see the warnings above); repair or re-index the shards"
                )
            cursor = Cursor(cursor.epoch + 1, 0)
