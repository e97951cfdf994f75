"""Building damaged and hostile shards for the loader's chaos tests, from real samples."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

from data_prep.atomic import sha256_file
from data_prep.manifest import Manifest, ShardInfo, load_manifest
from pretrain.data.shard_samples import parse_sample, read_tar


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of regular files ``(name, data)`` in the given order, as a shard writer would lay them out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A raw (webdataset-style) sample dict back as tar members."""
    return [(f"{sample['__key__']}.{ext}", data) for ext, data in sorted(sample.items()) if not ext.startswith("__")]


def real_samples(manifest: Manifest, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` raw samples of a dataset, in shard order."""
    out: list[dict[str, Any]] = []
    for shard in manifest.shards:
        out += read_tar(str(manifest.shard_path(shard)), 0, shard.samples, _fail)
        if len(out) >= limit:
            break
    return out[:limit]


def shard_uids(manifest: Manifest, names: list[str]) -> set[str]:
    """The uids of every sample of the named shards (all must be readable)."""
    transform = lambda image: image  # noqa: E731  (only the uid is wanted; the decoded image is dropped)
    uids: set[str] = set()
    for shard in manifest.shards:
        if shard.name in names:
            uids |= {parse_sample(s, transform)[2]
                     for s in read_tar(str(manifest.shard_path(shard)), 0, shard.samples, _fail)}
    return uids


def copy_dataset(src: Path, dst: Path) -> Manifest:
    """A private copy of a split's folder (shards + manifest) that a test may damage."""
    shutil.copytree(src, dst)
    return load_manifest(dst)


def add_shard(manifest: Manifest, name: str, data: bytes, samples: int) -> ShardInfo:
    """Write ``data`` as a new shard listed (with its true size and sha256) in the saved manifest."""
    path = manifest.root / name
    path.write_bytes(data)
    info = ShardInfo(name, samples, len(data), sha256_file(path))
    manifest.shards.append(info)
    manifest.save()
    return info


def _fail(message: str) -> None:
    raise AssertionError(f"the source dataset should be intact: {message}")
