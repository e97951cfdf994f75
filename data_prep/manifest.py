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
from typing import Any, Optional

from data_prep import storage
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
    # Every shard has a sample offset index at <name><index_suffix> (data_prep/sample_index.py); None: none.
    index_suffix: Optional[str] = None
    # Folder holding the shards (a Path, or a URL / pipe: template: see data_prep.storage); not serialised.
    root: storage.Location = field(default=Path("."), compare=False)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard_path(self, shard: ShardInfo) -> storage.Location:
        return storage.join(self.root, shard.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "webdataset",
            "version": FORMAT_VERSION,
            "split": self.split,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "shards": [asdict(s) for s in self.shards],
            "config": self.config,
            **({"index_suffix": self.index_suffix} if self.index_suffix else {}),
        }

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write ``manifest.json`` atomically into ``folder`` (default: ``self.root``)."""
        path = Path(folder if folder is not None else self.root) / MANIFEST_NAME
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path


def remote_manifest_location(path: str) -> tuple[str, str]:
    """(the manifest's location, the folder its shards are named from) for a URL or a pipe: template.
    Existence is not checked here: reading it is the one request that tells."""
    if path.startswith(storage.PIPE):
        return str(storage.join(path, MANIFEST_NAME)), path
    if path.endswith("/" + MANIFEST_NAME):
        return path, path.rsplit("/", 1)[0]
    return str(storage.join(path, MANIFEST_NAME)), path.rstrip("/")


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    """Accept a manifest file or the folder holding one (local); fail naming the path when neither exists."""
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
    root: storage.Location
    if storage.is_remote(path):
        where, root = remote_manifest_location(str(path))
        shown = storage.redact(where)
    else:
        p = resolve_manifest_path(path)
        where, root, shown = str(p), p.parent, str(p)
    try:
        raw = json.loads(storage.read_bytes(where))
        shards = [ShardInfo(**s) for s in raw["shards"]]
    except OSError as e:  # storage's messages already name the location and what to do
        raise ManifestError(f"unreadable manifest: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"unreadable manifest {shown}: {e}") from e
    manifest = Manifest(shards=shards, split=raw.get("split", "train"), config=raw.get("config", {}), root=root,
                        index_suffix=raw.get("index_suffix"))
    if not allow_empty and manifest.total_samples == 0:
        raise ManifestError(f"manifest {shown} lists no samples: the dataset is empty (did every sample get filtered out?)")
    return manifest
