"""Existing WebDataset shards (ours, img2dataset's, DataComp's) as a source: one unit per tar.

Tars are read in streaming mode and never extracted: consecutive members sharing a key (the member
path up to the first dot of its basename, as webdataset groups them) form one sample. Nothing is
ever unpickled; a sample carrying pickle members is rejected without reading them. Damaged or
hostile input becomes ``Rejected`` rows, never a crash:

``unsafe_path`` (absolute or ``..`` member names), ``unsafe_member`` (links, devices: anything but a
regular file), ``pickle_payload``, ``member_too_large``, ``duplicate_key``, ``bad_json``,
``no_image``, ``no_caption``, and one ``truncated_tar`` row when the tar ends without its
end-of-archive marker or has a corrupt header (the samples before the damage are still yielded).
"""
from __future__ import annotations

import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_prep.sources.base import REQUIRED_META, Rejected, Sample, Source, SourceConfig, SourceError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
PICKLE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})  # webdataset/torch decode these by unpickling
_READ_SUFFIXES = frozenset({*IMAGE_SUFFIXES, "txt", "json"})  # the only members whose bytes are read
_UID = re.compile(r"^[0-9a-f]{32}$")
_LIMIT_SEP = "#first="  # unit "<tar>#first=N": only the first N items of that tar (``limit``)
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class WebDatasetConfig(SourceConfig):
    recursive: bool = False  # also the tars in subfolders of root
    max_member_bytes: int = 64 << 20  # a larger member rejects its sample unread
    keep_json: list[str] = field(default_factory=list)  # more keys of the sample's json copied into meta

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_member_bytes < 1:
            raise ValueError(f"max_member_bytes: must be >= 1, got {self.max_member_bytes}")


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, suffix)`` of a member path as webdataset groups it (suffix lower-cased), or None
    when the basename has no dot or is hidden (such members belong to no sample)."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


class _TrackedTarInfo(tarfile.TarInfo):
    """Remembers why header reading stopped: tarfile ends iteration silently on a truncated or
    corrupt header, and only an all-zero block (``EOFHeaderError``) is a real end of archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.stop_reason = e  # type: ignore[attr-defined]
            raise


@dataclass
class _Group:
    """The members of one key seen so far."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    problem: str = ""  # the first member-level rejection reason
    index: int = 0  # position of the group in the tar (for uids of duplicates)


class WebDataset(Source):
    name = "webdataset"
    Config = WebDatasetConfig

    def __init__(self, cfg: WebDatasetConfig, name: str | None = None) -> None:
        super().__init__(cfg, name)
        if self.root.is_file():
            self.base, self.tars = self.root.parent, [self.root.name]
        else:
            pattern = "**/*.tar" if cfg.recursive else "*.tar"
            self.base = self.root
            self.tars = sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern) if p.is_file())
            if not self.tars:
                raise SourceError(f"sources.{self.label}.root: no .tar files in {self.root}"
                                  + ("" if cfg.recursive else " (set recursive: true to search subfolders)"))

    def plan(self, work_dir: Path, unit_size: int) -> list[str]:
        """One unit per tar; with ``limit``, tars are counted in order and the last one is cut short."""
        if self.cfg.limit is None:
            return list(self.tars)
        units, left = [], self.cfg.limit
        for tar in self.tars:
            if left == 0:
                break
            n = sum(1 for _ in zip(range(left), self._iter_tar(tar)))
            units.append(tar if n < left else f"{tar}{_LIMIT_SEP}{n}")
            left -= n
        return units

    def read(self, unit: str, work_dir: Path) -> Iterator[Sample | Rejected]:
        tar, sep, n = unit.partition(_LIMIT_SEP)
        items = self._iter_tar(tar)
        if sep:
            return (item for _, item in zip(range(int(n)), items))
        return items

    def _iter_tar(self, tar: str) -> Iterator[Sample | Rejected]:
        """The items of one tar, streamed; damage ends it with one ``truncated_tar`` row."""
        seen: set[str] = set()
        group: _Group | None = None
        count = 0
        try:
            with tarfile.open(self.base / tar, mode="r|*", tarinfo=_TrackedTarInfo) as tf:
                while (m := tf.next()) is not None:
                    tf.members.clear()  # streaming: do not keep every header of a big shard
                    if m.isdir() and not unsafe_name(m.name):
                        continue
                    parts = split_key(m.name)
                    problem = self._problem(m, parts[1] if parts else "")
                    if parts is None and not problem:
                        continue  # no key (no dot in the name): webdataset skips these too
                    key, suffix = parts or (m.name, "")
                    if group is None or key != group.key or suffix in group.files:
                        if group is not None:
                            count += 1
                            yield self._finish(tar, group, seen)
                        group = _Group(key=key, index=count)
                    group.problem = group.problem or problem
                    data = b""
                    if not group.problem and suffix in _READ_SUFFIXES:
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                    group.files[suffix] = data
                stop = getattr(tf, "stop_reason", None)
        except _TAR_ERRORS as e:  # damaged inside a member: the sample being read is incomplete, dropped
            yield self._truncated(tar, count, f"{type(e).__name__}: {e}")
            return
        if group is not None:
            count += 1
            yield self._finish(tar, group, seen)
        if not isinstance(stop, tarfile.EOFHeaderError):  # a truncated/corrupt header ended the stream
            yield self._truncated(tar, count, f"{type(stop).__name__}: {stop}")

    def _problem(self, m: tarfile.TarInfo, suffix: str) -> str:
        if unsafe_name(m.name):
            return f"unsafe_path: member {m.name!r}"
        if not m.isreg():
            return f"unsafe_member: {m.name!r} is not a regular file (tar type {m.type!r})"
        if suffix.rpartition(".")[2] in PICKLE_SUFFIXES:
            return f"pickle_payload: member {m.name!r} would need unpickling"
        if m.size > self.cfg.max_member_bytes:
            return f"member_too_large: {m.name!r} has {m.size} bytes > max_member_bytes {self.cfg.max_member_bytes}"
        return ""

    def _truncated(self, tar: str, count: int, detail: str) -> Rejected:
        source_id = f"{tar}/#truncated"
        return Rejected(uid=self.uid(source_id), source=self.label, source_id=source_id,
                        reason=f"truncated_tar: {tar} after {count} samples ({detail})")

    def _finish(self, tar: str, g: _Group, seen: set[str]) -> Sample | Rejected:
        source_id = f"{tar}/{g.key}"
        if g.key in seen:  # same key again: keep the uid of its first occurrence unique
            source_id = f"{source_id}#{g.index}"
            return Rejected(uid=self.uid(source_id), source=self.label, source_id=source_id,
                            reason=f"duplicate_key: {g.key!r} appears again in {tar}")
        seen.add(g.key)
        meta: dict[str, Any] = {}
        problem = g.problem
        if not problem and "json" in g.files:
            try:
                meta = json.loads(g.files["json"])
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            except ValueError as e:
                problem = f"bad_json: {g.key}.json: {e}"
        uid = meta.get("uid") if isinstance(meta.get("uid"), str) and _UID.match(meta["uid"]) else self.uid(source_id)
        ext = next((s for s in IMAGE_SUFFIXES if s in g.files), None)
        problem = problem or ("no_image" if ext is None else "no_caption" if "txt" not in g.files else "")
        if problem:
            return Rejected(uid=uid, source=self.label, source_id=source_id, reason=problem)
        return Sample(uid=uid, source=self.label, source_id=source_id, image=g.files[ext],
                      image_ext="jpg" if ext == "jpeg" else ext,
                      caption=g.files["txt"].decode("utf-8", "surrogateescape").strip(),
                      meta=self._meta(meta))

    def _meta(self, js: dict[str, Any]) -> dict[str, Any]:
        """Contract keys from the sample's json (None where absent), its url and the ``keep_json`` keys."""
        meta = {k: js.get(k) for k in REQUIRED_META}
        meta.update({k: js[k] for k in ("url", *self.cfg.keep_json) if k in js})
        return meta
