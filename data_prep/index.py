"""Describe existing WebDataset shards (e.g. written by img2dataset) with a ``manifest.json``.

Samples are counted the way the training loader (``pretrain.data.shard_samples``) will see them:
consecutive regular members sharing a key (webdataset's ``base_plus_ext``) form one sample. Only
headers are read, never member data, and nothing is extracted. A shard that is damaged (truncated,
corrupt, not a tar) or holds a regular member with an absolute or ``..`` path is refused with an
error naming it, so no manifest ever lists a shard that training or a later ``tar -x`` would trip on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from data_prep import PrepError
from data_prep.atomic import sha256_file
from data_prep import sample_index
from data_prep.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from data_prep.sources.webdataset import TAR_ERRORS, damage, open_tar_stream, text_id, unsafe_name

_REBUILD = ("remove it from the folder, or re-shard the folder with `python -m data_prep build` and a "
            "webdataset source, which drops such samples")


def count_samples(tar: str | Path) -> int:
    """Number of samples (runs of members sharing a key) in one tar; raises ``PrepError`` naming the
    shard when it is damaged or holds a member with an unsafe path."""
    tar = Path(tar)
    count, key = 0, None
    try:
        with open_tar_stream(tar) as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # streaming: memory stays flat however many members
                if not m.isreg():  # links, devices, folders: no sample's data (the loader skips them too)
                    continue
                if unsafe_name(m.name):
                    raise PrepError(f"{text_id(str(tar))}: member {m.name!r} has an absolute or '..' path; {_REBUILD}")
                name_key, _ = base_plus_ext(m.name)
                if name_key is not None and name_key != key:
                    count, key = count + 1, name_key
            why = damage(tf)
    except TAR_ERRORS as e:
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        raise PrepError(f"{text_id(str(tar))}: not a complete tar shard ({why}) after {count} samples; {_REBUILD}")
    return count


def index_shards(folder: str | Path, split: str = "train", config: dict[str, Any] | None = None) -> Manifest:
    """A manifest (not yet saved) for every ``*.tar`` directly in ``folder``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepError(f"not a folder of shards: {folder}")
    tars = sorted(t for t in folder.glob("*.tar") if t.is_file())
    if not tars:
        raise PrepError(f"no .tar shards in {folder}")
    shards = [ShardInfo(name=t.name, samples=count_samples(t), bytes=t.stat().st_size, sha256=sha256_file(t)) for t in tars]
    return Manifest(shards=shards, split=split, config=config or {"indexed_from": str(folder.resolve())}, root=folder)


def add_sample_indexes(manifest: Manifest) -> Manifest:
    """Write every shard's sample offset index (data_prep/sample_index.py) and record them in the
    manifest, which is saved; a shard whose sample count differs from its entry is refused.
    Compressed shards cannot be seeked: a folder holding any gets no sample indexes."""
    if any(sample_index.is_compressed(Path(manifest.shard_path(s))) for s in manifest.shards):
        manifest.index_suffix = None
        manifest.save()
        return manifest
    for shard in manifest.shards:
        path = Path(manifest.shard_path(shard))
        try:
            offsets, end = sample_index.scan_offsets(path)
        except (OSError, *TAR_ERRORS) as e:
            raise PrepError(f"{text_id(str(path))}: cannot index it ({type(e).__name__}: {e}); {_REBUILD}") from e
        if len(offsets) != shard.samples:
            raise PrepError(f"{text_id(str(path))} holds {len(offsets)} samples, its manifest entry {shard.samples}: "
                            "re-index the folder with --force")
        sample_index.write_sample_index(path, offsets, end)
    manifest.index_suffix = sample_index.SUFFIX
    manifest.save()
    return manifest


def write_index(folder: str | Path, split: str = "train", force: bool = False, samples_only: bool = False) -> Manifest:
    """Index ``folder``: its manifest and every shard's sample index. An existing manifest is
    replaced only with ``force``; ``samples_only`` keeps it and adds the sample indexes."""
    target = Path(folder) / MANIFEST_NAME
    if samples_only:
        return add_sample_indexes(load_manifest(folder))
    if target.exists() and not force:
        raise PrepError(f"{target} already exists (it may hold the build config); pass --force to replace it, or "
                        "--samples-only to keep it and add the shards' sample indexes")
    return add_sample_indexes(index_shards(folder, split))
