"""The shard contract's sample records (read by ``pretrain.data``).

A tar holds samples as files sharing a key, the key being the sample's uid:
``<uid>.<png|jpg|webp>`` (encoded image), ``<uid>.txt`` (UTF-8 caption) and ``<uid>.json``
(``uid``, ``source``, ``source_id``, ``width``, ``height``, ``original_width``,
``original_height``, ``lang``, source extras and the stages' measures). Workers write these records
into their units' tars; the merge copies them unchanged into the final shards, in build order
(units interleaved across sources, input order within a unit). Every shard holds exactly
``samples_per_shard`` samples except the last, so ranks can be balanced from the manifest alone.
Tars are byte-for-byte reproducible (fixed mtime, sorted members), hence so are their sha256.

A sample's members are serialised once (``record_bytes``: tarfile's own USTAR headers, data padded
to 512-byte blocks) and from then on only copied as a byte range: the merge builds each shard by
concatenating ranges of the units' tars (``TarAppender``) instead of parsing and re-serialising
every member, which was most of a build's CPU time.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

from data_prep.filters.base import Measures
from data_prep.sources.base import REQUIRED_META, Sample

SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
TAR_MTIME = 0  # fixed member mtime: rebuilding the same data gives the same bytes and sha256


@dataclass
class KeptSample:
    sample: Sample
    measures: Measures = field(default_factory=dict)


def sample_json(kept: KeptSample) -> dict[str, Any]:
    """The ``<uid>.json`` member: identity, the contract's size/lang keys, source extras, measures."""
    s = kept.sample
    missing = [k for k in REQUIRED_META if s.meta.get(k) is None]
    if missing:
        raise ValueError(f"sample {s.source}:{s.source_id} lacks meta {missing} required by the shard contract")
    # Meta last: the contract's width/height are the written image's, while the image stage's
    # measures of the same names are the original's (also in original_width/height and decisions).
    where = {"url": s.url} if s.url is not None else {}
    return {**kept.measures, "uid": s.uid, "source": s.source, "source_id": s.source_id, **where, **s.meta}


def tar_record(kept: KeptSample) -> dict[str, Any]:
    """One webdataset sample dict, already encoded to bytes (the writer's encoder is off)."""
    s = kept.sample
    return {
        "__key__": s.uid,
        s.image_ext: s.image,
        "txt": s.caption.encode("utf-8"),
        "json": json.dumps(sample_json(kept), sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def record_bytes(record: dict[str, Any]) -> bytes:
    """A webdataset sample dict (``__key__`` plus extension -> bytes) as consecutive tar members,
    sorted by extension (the order webdataset's own writer uses)."""
    key = record["__key__"]
    return b"".join(_member(f"{key}.{ext}", record[ext]) for ext in sorted(record) if not ext.startswith("__"))


class TarAppender:
    """Writes a tar as a sequence of already serialised samples (one blob = one sample's members);
    ``append`` returns each blob's ``(offset, size)`` in the file so it can be copied out again
    without parsing, and ``starts`` keeps every offset (the shard's sample index)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.offset = f, 0
        self.starts: list[int] = []

    def append(self, blob: bytes) -> tuple[int, int]:
        start = self.offset
        self.starts.append(start)
        self.f.write(blob)
        self.offset += len(blob)
        return start, len(blob)

    def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole tar record as tarfile does."""
        end = 2 * tarfile.BLOCKSIZE
        self.f.write(b"\0" * (end + (-(self.offset + end) % tarfile.RECORDSIZE)))


def copy_ranges(out: TarAppender, tar: str | Path, ranges: Sequence[tuple[int, int]]) -> None:
    """Append the byte ranges ``(offset, size)`` of ``tar`` (whole samples) to ``out``, in order."""
    with open(tar, "rb") as f:
        for offset, size in ranges:
            f.seek(offset)
            blob = f.read(size)
            if len(blob) != size:
                raise ValueError(f"{tar} is shorter than its decisions say ({offset}+{size}): it was damaged")
            out.append(blob)
