"""Write one split's kept samples as balanced WebDataset shards plus their ``manifest.json``.

Shard contract (read by ``pretrain.data``): a tar holds samples as files sharing a key, the key
being the sample's uid: ``<uid>.<png|jpg|webp>`` (encoded image), ``<uid>.txt`` (UTF-8 caption) and
``<uid>.json`` (``uid``, ``source``, ``source_id``, ``width``, ``height``, ``original_width``,
``original_height``, ``lang``, source extras and the filters' measures). Samples go in uid order,
which interleaves sources pseudo-randomly (uids are hashes). Every shard holds exactly
``samples_per_shard`` samples except the last, so ranks can be balanced from the manifest alone.
Tars are byte-for-byte reproducible (fixed mtime, sorted members), hence so are their sha256.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import webdataset as wds
from tqdm import tqdm

from data_prep.atomic import atomic_write, sha256_file
from data_prep.filters.base import Measures
from data_prep.manifest import Manifest, ShardInfo
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
    return {"uid": s.uid, "source": s.source, "source_id": s.source_id, **s.meta, **kept.measures}


def tar_record(kept: KeptSample) -> dict[str, Any]:
    """One webdataset sample dict, already encoded to bytes (the writer's encoder is off)."""
    s = kept.sample
    return {
        "__key__": s.uid,
        s.image_ext: s.image,
        "txt": s.caption.encode("utf-8"),
        "json": json.dumps(sample_json(kept), sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def write_shard(path: Path, samples: Sequence[KeptSample]) -> ShardInfo:
    """Write ``samples`` to ``path`` under a temp name, rename when complete, then describe it."""
    with atomic_write(path, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as writer:
            for kept in samples:
                writer.write(tar_record(kept))
    return ShardInfo(name=path.name, samples=len(samples), bytes=path.stat().st_size, sha256=sha256_file(path))


def write_split(
    samples: Sequence[KeptSample],
    folder: str | Path,
    split: str,
    samples_per_shard: int,
    config: dict[str, Any],
) -> Manifest:
    """Shard ``samples`` (any order; written in uid order) into ``folder`` and save its manifest.

    An empty split still gets a manifest (with no shards) so readers fail with a clear message.
    Shards of an earlier build that the new manifest does not list are removed afterwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(samples, key=lambda k: k.sample.uid)
    chunks = [ordered[i: i + samples_per_shard] for i in range(0, len(ordered), samples_per_shard)]
    shards = [
        write_shard(folder / SHARD_NAME.format(i), chunk)
        for i, chunk in enumerate(tqdm(chunks, desc=f"shards {split}", unit="shard", disable=None))
    ]
    manifest = Manifest(shards=shards, split=split, config=config, root=folder)
    manifest.save()
    listed = {s.name for s in shards}
    for stale in folder.glob(SHARD_GLOB):
        if stale.name not in listed:
            stale.unlink()
    return manifest
