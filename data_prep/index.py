"""Describe existing WebDataset shards (e.g. written by img2dataset) with a ``manifest.json``.

Samples are counted the way the loader will see them: webdataset's own tar reader groups members
by key, so the manifest's counts match what training iterates over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from webdataset.tariterators import tarfile_samples

from data_prep import PrepError
from data_prep.atomic import sha256_file
from data_prep.manifest import MANIFEST_NAME, Manifest, ShardInfo


def count_samples(tar: str | Path) -> int:
    """Number of samples (groups of members sharing a key) in one tar."""
    return sum(1 for _ in tarfile_samples([{"url": str(tar)}]))


def index_shards(folder: str | Path, split: str = "train", config: dict[str, Any] | None = None) -> Manifest:
    """A manifest (not yet saved) for every ``*.tar`` directly in ``folder``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepError(f"not a folder of shards: {folder}")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise PrepError(f"no .tar shards in {folder}")
    shards = [ShardInfo(name=t.name, samples=count_samples(t), bytes=t.stat().st_size, sha256=sha256_file(t)) for t in tars]
    return Manifest(shards=shards, split=split, config=config or {"indexed_from": str(folder.resolve())}, root=folder)


def write_index(folder: str | Path, split: str = "train", force: bool = False) -> Manifest:
    """Index ``folder`` and save its manifest; refuse to replace an existing one unless ``force``."""
    target = Path(folder) / MANIFEST_NAME
    if target.exists() and not force:
        raise PrepError(f"{target} already exists (it may hold the build config); pass --force to replace it")
    manifest = index_shards(folder, split)
    manifest.save()
    return manifest
