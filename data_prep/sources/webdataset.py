"""Existing WebDataset shards (ours, img2dataset's, DataComp's) as a source: one unit per tar.

Tars are read in streaming mode and never extracted: consecutive members sharing a key (the member
path up to the first dot of its basename, as webdataset groups them) form one sample. Nothing is
ever unpickled; a sample carrying pickle members is rejected without reading them. Damaged or
hostile input becomes ``Rejected`` rows, never a crash:

``unsafe_path`` (absolute or ``..`` member names), ``unsafe_member`` (links, devices: anything but a
regular file), ``pickle_payload``, ``member_too_large``, ``duplicate_key``, ``duplicate_uid`` (a json ``uid`` met
before in the tar: a copied sample, or one made to collide), ``bad_json`` (not JSON,
not an object, nested too deeply, or text that is not UTF-8), ``no_image``, ``no_caption``, and one
``truncated_tar`` row when the tar ends without its end-of-archive marker, inside a member, or has a
corrupt header (the samples before the damage are still yielded).

Ids stay valid UTF-8 whatever the member names hold (undecodable bytes appear as ``\\xNN``), and
the contract keys of the sample's json are used only when they have the contract's types, so no
hostile shard can break the decisions table or the shard json written later.
"""
from __future__ import annotations

import contextlib
import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from data_prep.sources.base import REQUIRED_META, Rejected, Sample, Source, SourceConfig, SourceError, text_id

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
PICKLE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})  # webdataset/torch decode these by unpickling
_READ_SUFFIXES = frozenset({*IMAGE_SUFFIXES, "txt", "json"})  # the only members whose bytes are read
_UID = re.compile(r"^[0-9a-f]{32}$")
_LIMIT_SEP = "#first="  # unit "<tar>#first=N": only the first N items of that tar (``limit``)
# What reading a damaged, truncated or non-tar file raises (bz2's errors are OSError).
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_MAX_EMPTY_READS = 16  # reads at end of file in a row: past this, tarfile is skipping data that is not there
_SIZE_KEYS = ("width", "height", "original_width", "original_height")
_MAX_SIDE = 1 << 31  # a json "width" beyond this is no image's


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


class _EndGuard:
    """The raw shard file as tarfile's stream reader sees it, raising ``EOFError`` once it is read
    at end of file again and again. tarfile skips a member's data by reading its declared size in
    10 KiB blocks without stopping at end of file, so a 1 KB tar whose header declares 2**88 bytes
    (a base-256 or pax ``size``) would otherwise keep it reading nothing for ever."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._empty = f, 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._empty = 0 if data else self._empty + 1
        if self._empty > _MAX_EMPTY_READS:
            raise EOFError("the tar ends inside a member: its header declares more bytes than the file holds")
        return data


@contextlib.contextmanager
def open_tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """``path`` as a streaming tar (any compression): members are read in order, never extracted.
    Damage raises one of ``TAR_ERRORS`` while reading, except a cut or corrupt header, which ends
    the members silently (as in tarfile): ``damage(tf)`` tells it apart from a proper end."""
    with open(path, "rb") as raw, tarfile.open(fileobj=_EndGuard(raw), mode="r|*", tarinfo=_TrackedTarInfo) as tf:
        yield tf


def damage(tf: tarfile.TarFile) -> str | None:
    """After the last member of ``open_tar_stream``: why reading stopped, if not at a proper end."""
    stop = getattr(tf, "stop_reason", None)
    return None if isinstance(stop, tarfile.EOFHeaderError) else f"{type(stop).__name__}: {stop}"


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
        """The items of one tar, each with a uid of its own (the builder keys a unit's rows by uid)."""
        uids: set[str] = set()
        for item in self._iter_items(tar):
            if item.uid in uids:
                if isinstance(item, Sample):
                    item = Rejected(uid=item.uid, source=item.source, source_id=item.source_id,
                                    reason=f"duplicate_uid: json uid {item.uid} appears again in {text_id(tar)}")
                n = 0
                while item.uid in uids:
                    item.uid, n = self.uid(f"{item.source_id}#uid{n}"), n + 1
            uids.add(item.uid)
            yield item

    def _iter_items(self, tar: str) -> Iterator[Sample | Rejected]:
        """The items of one tar, streamed; damage ends it with one ``truncated_tar`` row."""
        seen: set[str] = set()
        group: _Group | None = None
        count = 0
        try:
            with open_tar_stream(self.base / tar) as tf:
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
                stop = damage(tf)
        except TAR_ERRORS as e:  # damaged inside a member: the sample being read is incomplete, dropped
            yield self._truncated(tar, count, f"{type(e).__name__}: {e}")
            return
        if group is not None:
            count += 1
            yield self._finish(tar, group, seen)
        if stop is not None:  # a truncated/corrupt header ended the stream
            yield self._truncated(tar, count, stop)

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
        source_id = text_id(f"{tar}/#truncated")
        return Rejected(uid=self.uid(source_id), source=self.label, source_id=source_id,
                        reason=f"truncated_tar: {text_id(tar)} after {count} samples ({detail})")

    def _finish(self, tar: str, g: _Group, seen: set[str]) -> Sample | Rejected:
        source_id = text_id(f"{tar}/{g.key}")
        if g.key in seen:  # same key again: keep the uid of its first occurrence unique
            source_id = f"{source_id}#{g.index}"
            return Rejected(uid=self.uid(source_id), source=self.label, source_id=source_id,
                            reason=f"duplicate_key: {g.key!r} appears again in {text_id(tar)}")
        seen.add(g.key)
        meta: dict[str, Any] = {}
        problem = g.problem
        if not problem and "json" in g.files:
            try:
                parsed = json.loads(g.files["json"])
                if not isinstance(parsed, dict):  # "[1, 2]", "null": valid JSON but no metadata object
                    raise ValueError(f"a JSON {type(parsed).__name__}, not an object")
                meta = parsed
            except ValueError as e:
                problem = f"bad_json: {source_id}.json: {e}"
            except RecursionError:  # "[[[[..." : the json module gives up past the recursion limit
                problem = f"bad_json: {source_id}.json: nested too deeply"
        uid = meta.get("uid") if isinstance(meta.get("uid"), str) and _UID.match(meta["uid"]) else self.uid(source_id)
        ext = next((s for s in IMAGE_SUFFIXES if s in g.files), None)
        problem = problem or ("no_image" if ext is None else "no_caption" if "txt" not in g.files else "")
        kept = self._meta(meta)
        if not problem:
            try:  # "\\ud800" escapes decode to lone surrogates, which the shard's UTF-8 json cannot hold
                json.dumps(kept, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                problem = f"bad_json: {source_id}.json holds \\uXXXX escapes of lone surrogates (not text)"
        if problem:
            return Rejected(uid=uid, source=self.label, source_id=source_id, reason=problem)
        return Sample(uid=uid, source=self.label, source_id=source_id, image=g.files[ext],
                      image_ext="jpg" if ext == "jpeg" else ext,
                      caption=g.files["txt"].decode("utf-8", "surrogateescape").strip(),
                      meta=kept)

    def _meta(self, js: dict[str, Any]) -> dict[str, Any]:
        """Contract keys from the sample's json (None where absent or of the wrong type: the worker
        then measures them itself), its url and the ``keep_json`` keys."""
        meta = {k: js.get(k) for k in REQUIRED_META}
        for k in _SIZE_KEYS:  # type() is int: a JSON true is no width
            if not (type(meta[k]) is int and 0 <= meta[k] < _MAX_SIDE):
                meta[k] = None
        if not isinstance(meta["lang"], str):
            meta["lang"] = None
        meta.update({k: js[k] for k in ("url", *self.cfg.keep_json) if k in js})
        return meta
