"""Per-shard sample offset index: where each sample starts in its tar, so a reader seeks to sample k
(a resume mid-epoch, a range starting mid-shard) instead of reading the k samples before it.

One small file beside each shard, ``<shard>.idx`` (``shard-000000.tar.idx``): the magic ``CFIDX001``,
then little-endian uint64 values: the sample count n, the byte offset of each sample's first tar
header (n values, increasing, multiples of 512), and the end of the last sample (where the tar's
end-of-archive blocks start). 5,000 samples take 40 KB. Samples are counted as the loader and
``data_prep index`` count them: consecutive regular members sharing a key (webdataset's rule).

Written by the builder for every shard it writes, and by ``python -m data_prep index`` for existing
shards; the manifest's ``index_suffix`` says they exist. A reader checks an index against its
manifest entry (count, bounds) before using it, and a seek that does not land on a tar header is
reported as an index that does not match its shard, then read from the start.
"""
from __future__ import annotations

import struct
import tarfile
from pathlib import Path
from typing import Sequence

from webdataset.tariterators import base_plus_ext

from data_prep import storage
from data_prep.atomic import atomic_write

SUFFIX = ".idx"
MAGIC = b"CFIDX001"


class IndexError_(ValueError):
    """An index that does not describe its shard; the message names both and how to rebuild it."""


def index_location(root: storage.Location, shard_name: str) -> storage.Location:
    """Where the index of the shard ``shard_name`` of the folder ``root`` lives (any store)."""
    return storage.join(root, shard_name + SUFFIX)


def encode(offsets: Sequence[int], end: int) -> bytes:
    return MAGIC + struct.pack(f"<{len(offsets) + 2}Q", len(offsets), *offsets, end)


def write_sample_index(shard: str | Path, offsets: Sequence[int], end: int) -> Path:
    """Write ``<shard>.idx`` atomically; returns its path."""
    path = Path(str(shard) + SUFFIX)
    with atomic_write(path, "wb") as f:
        f.write(encode(offsets, end))
    return path


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def is_compressed(tar: str | Path) -> bool:
    """A compressed tar has no byte offsets to seek to: it gets no sample index."""
    with open(tar, "rb") as f:
        head = f.read(6)
    return head.startswith(COMPRESSED_MAGIC)


def scan_offsets(tar: str | Path) -> tuple[list[int], int]:
    """(offset of each sample's first header, end of the last member's data) of an uncompressed tar,
    from its headers alone, through the builder's hardened tar reader."""
    from data_prep.sources.webdataset import open_tar_stream  # late: sources import this package's storage

    offsets: list[int] = []
    end, key = 0, None
    with open_tar_stream(Path(tar)) as tf:
        while (member := tf.next()) is not None:
            tf.members.clear()  # streaming: memory stays flat
            if not member.isreg():
                continue
            name_key, _ = base_plus_ext(member.name)
            if name_key is None:
                continue
            if name_key != key:
                offsets.append(member.offset)
                key = name_key
            end = member.offset_data + member.size + (-member.size % tarfile.BLOCKSIZE)
    return offsets, end


def decode(data: bytes, where: str, samples: int, size: int) -> list[int]:
    """The sample offsets of an index file's bytes, checked against the shard's manifest entry."""
    fix = "rebuild the indexes with `python -m data_prep index --force FOLDER`"
    if data[:8] != MAGIC or len(data) < 24 or (len(data) - 8) % 8:
        raise IndexError_(f"sample index {where} is not an index file; {fix}")
    n = struct.unpack_from("<Q", data, 8)[0]
    if n != samples or len(data) != 8 + 8 * (n + 2):
        raise IndexError_(f"sample index {where} lists {n} samples, its shard {samples} (manifest); {fix}")
    values = list(struct.unpack_from(f"<{n + 1}Q", data, 16))
    offsets, end = values[:-1], values[-1]
    if any(b <= a for a, b in zip(offsets, offsets[1:])) or any(o % tarfile.BLOCKSIZE for o in offsets) \
            or (offsets and offsets[-1] >= end) or end > size:
        raise IndexError_(f"sample index {where} does not fit its shard of {size} bytes; {fix}")
    return offsets


def read_offsets(root: storage.Location, shard_name: str, samples: int, size: int) -> list[int]:
    """Sample offsets of a shard from its index (one small read); raises OSError or IndexError_."""
    where = index_location(root, shard_name)
    return decode(storage.read_bytes(where), storage.redact(where), samples, size)
