"""A balanced, resumable stream of training batches read from WebDataset shards.

Balance. Each epoch the shards are put in a seeded random order and their samples, end to end, form
one sequence that is cut into C = world_size x workers contiguous ranges of equal length (the < C
samples left over are skipped that epoch; the order changes every epoch, so not always the same
ones). Consumer c reads only the shards overlapping its range, starting mid-shard if needed. Every
consumer thus gets exactly the same number of samples per epoch whatever the shard count (fewer
shards than consumers included), and streams are endless (epoch follows epoch), so no rank ever
waits for another or runs out of batches mid-step.

Position. Consumer c's stream is a pure function of (seed, epoch, c): its position is a
:class:`Cursor` (epoch, samples emitted that epoch, corrupt ones included). Resuming replays that
epoch's raw stream to the cursor without decoding any image, then continues: the batches after a
resume are the batches an uninterrupted run would have produced.
"""
from __future__ import annotations

import logging
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_prep.manifest import Manifest
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.transforms import decode_image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_ERRORS = 20  # per consumer: enough to diagnose, not enough to flood a long run's log


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
        if end > lo and begin < hi:
            out.append((i, max(lo, begin) - begin, min(hi, end) - begin))
        begin = end
    return out


def read_tar(path: str, start: int, stop: int, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples [start, stop) of one shard as webdataset dicts (bytes, nothing decoded).
    A truncated or unreadable shard ends early and is reported, never raised. (``tarfile`` stops
    silently when a file is cut inside a header, so a shard ending short of ``stop`` is reported too.)"""
    read = 0
    try:
        with open(path, "rb") as f:
            files = ({**member, "__url__": path} for member in tar_file_iterator(f))  # group_by_keys wants the url
            for read, sample in enumerate(group_by_keys(files), start=1):
                if read > start:
                    yield sample
                if read >= stop:
                    return
    except (OSError, tarfile.TarError, ValueError) as e:
        on_error(f"shard {path} is truncated or unreadable after {read} samples: {type(e).__name__}: {e}")
        return
    if read < stop:
        on_error(f"shard {path} is truncated or unreadable: it ended after {read} of {stop} samples")


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


def parse_sample(raw: dict[str, Any], transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, str]:
    """webdataset dict -> (image (3, H, W), caption); raises ValueError naming what is wrong."""
    key = raw.get("__key__", "?")
    ext = next((k for k in IMAGE_KEYS if k in raw), None)
    if ext is None:
        raise ValueError(f"sample {key} has no image (expected one of {IMAGE_KEYS})")
    if "txt" not in raw:
        raise ValueError(f"sample {key} has no caption (.txt)")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"sample {key} caption is not UTF-8: {e}") from e
    if not caption:
        raise ValueError(f"sample {key} caption is empty")
    try:
        image = decode_image(raw[ext])
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"sample {key} image is corrupt: {type(e).__name__}: {e}") from e
    return transform(image), caption


class ShardStream(IterableDataset):
    """Endless batches for one rank; with DataLoader workers, each worker is one consumer slot.

    ``slot_offset`` rotates worker ids onto slots so that after a resume the DataLoader's first
    worker serves the slot whose batch is next (DataLoader takes batches from workers round-robin).
    """

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, rank: int, world_size: int, workers: int, seed: int, shuffle_buffer: int,
                 cursors: Optional[dict[int, Cursor]] = None, slot_offset: int = 0) -> None:
        self.manifest, self.tokenizer, self.transform = manifest, tokenizer, transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers, self.seed, self.shuffle_buffer = max(1, workers), seed, shuffle_buffer
        self.cursors = dict(cursors or {})
        self.slot_offset = slot_offset

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.slot_offset) % self.workers
        return self._batches(slot, self.cursors.get(slot, Cursor()))

    def raw_epoch(self, consumer: int, epoch: int, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
        """Consumer's raw samples of one epoch, shuffled; deterministic in (seed, epoch, consumer)."""
        shards = self.manifest.shards
        order = shard_order(len(shards), self.seed, epoch)
        ranges = consumer_ranges([shards[i].samples for i in order], consumer, self.consumers)

        def read() -> Iterator[dict[str, Any]]:
            for pos, start, stop in ranges:
                yield from read_tar(str(self.manifest.shard_path(shards[order[pos]])), start, stop, on_error)

        rng = random.Random(f"{self.seed}/{epoch}/{consumer}")
        return buffered_shuffle(read(), self.shuffle_buffer, rng)

    def _batches(self, slot: int, cursor: Cursor) -> Iterator[dict[str, Any]]:
        consumer = self.rank * self.workers + slot
        errors = 0

        def on_error(message: str) -> None:
            nonlocal errors
            errors += 1
            if errors <= MAX_LOGGED_ERRORS:
                log.warning("data: skipped (%s)", message)

        images: list[torch.Tensor] = []
        captions: list[str] = []
        corrupt_since_batch = 0
        cursor = Cursor(cursor.epoch, cursor.offset)
        while True:
            skip, good = cursor.offset, 0
            for i, raw in enumerate(self.raw_epoch(consumer, cursor.epoch, on_error)):
                if i < skip:  # resuming: replay without decoding
                    continue
                cursor.offset += 1
                try:
                    image, caption = parse_sample(raw, self.transform)
                except ValueError as e:
                    corrupt_since_batch += 1
                    on_error(str(e))
                    continue
                good += 1
                images.append(image)
                captions.append(caption)
                if len(images) == self.batch_size:
                    yield {
                        "images": torch.stack(images),  # (B, 3, H, W)
                        "tokens": self.tokenizer(captions),  # (B, L)
                        "slot": slot,
                        "cursor": (cursor.epoch, cursor.offset),
                        "corrupt": corrupt_since_batch,
                    }
                    images, captions, corrupt_since_batch = [], [], 0
            if skip == 0 and good == 0:
                raise RuntimeError(
                    f"data: consumer {consumer} read no usable sample in a whole epoch of "
                    f"{self.manifest.root} (all shards unreadable or every sample corrupt?)"
                )
            cursor = Cursor(cursor.epoch + 1, 0)

