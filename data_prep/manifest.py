"""``manifest.json``: the contract between the dataset builder (writer) and the loader (reader).

It sits beside the shards it describes and lists every shard's file name, sample count, byte size
and sha256, the totals, and the resolved build config. A shard is listed only after it was written
completely, and the manifest itself is replaced atomically, so a reader never sees a partial state.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.atomic import atomic_write

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or describes no data; the message names the path."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardInfo]
    split: str = "train"
    config: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False)  # folder holding the shards; not serialised

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "webdataset",
            "version": FORMAT_VERSION,
            "split": self.split,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "shards": [asdict(s) for s in self.shards],
            "config": self.config,
        }

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write ``manifest.json`` atomically into ``folder`` (default: ``self.root``)."""
        path = Path(folder if folder is not None else self.root) / MANIFEST_NAME
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    """Accept a manifest file or the folder holding one; fail naming the path when neither exists."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
        if not p.exists():
            raise ManifestError(
                f"no {MANIFEST_NAME} in {p.parent}: build the dataset with `python -m data_prep build`, "
                f"or index existing shards with `python -m data_prep index {p.parent}`"
            )
    elif not p.exists():
        raise ManifestError(f"dataset path does not exist: {p}")
    return p


def load_manifest(path: str | os.PathLike, *, allow_empty: bool = False) -> Manifest:
    """Read and validate a manifest; errors name the file and what is wrong with it."""
    p = resolve_manifest_path(path)
    try:
        raw = json.loads(p.read_text())
        shards = [ShardInfo(**s) for s in raw["shards"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"unreadable manifest {p}: {e}") from e
    manifest = Manifest(shards=shards, split=raw.get("split", "train"), config=raw.get("config", {}), root=p.parent)
    if not allow_empty and manifest.total_samples == 0:
        raise ManifestError(f"manifest {p} lists no samples: the dataset is empty (did every sample get filtered out?)")
    return manifest
