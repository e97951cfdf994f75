"""Untrusted shard bytes -> raw samples -> (image, caption, uid), for the training stream.

Shards come from our builder, from img2dataset, or from a copy that went wrong, so every byte is
treated as hostile. Only image, ``txt`` and ``json`` members are ever read: webdataset's default
decoders would unpickle ``.pyd``/``.pickle`` and ``torch.load`` ``.pth`` members, and this reader
never even reads them, so nothing from a shard is ever unpickled. Members are size-checked before
they are read and images before they are decoded, so one hostile sample cannot exhaust a worker's
memory. Every problem becomes a skipped sample (``ValueError`` naming it) or a shard that ends
early (reported through ``on_error``), never an exception out of the stream.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext  # key/extension split: samples group as in webdataset

from data_prep import storage
from pretrain.data.transforms import to_rgb

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
READ_KEYS = frozenset({*IMAGE_KEYS, "txt", "json"})  # the only members whose bytes are read
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL plugins allowed: never EPS (Ghostscript) or other exotic parsers
MAX_MEMBER_BYTES = {"txt": 64 << 10, "json": 1 << 20}  # larger: not a caption / metadata but junk
MAX_IMAGE_BYTES = 64 << 20
# Bounds decoding (8192^2 px) and, as transforms.to_rgb pads to a square, also its output: a 1 x 60000
# PNG is a few hundred bytes but would pad to a 60000^2 canvas (10 GB).
MAX_IMAGE_SIDE = 8192
MAX_UID_CHARS = 256
REMOTE_RETRIES = 2  # a remote shard whose read fails is reopened this many times, then skipped and counted
RETRY_WAIT_S = 1.0  # times the attempt number


def member_limit(ext: str) -> int:
    return MAX_MEMBER_BYTES.get(ext, MAX_IMAGE_BYTES)


def iter_tar_samples(f: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key form one sample ``{"__key__", "__url__", ext: bytes}``, as
    webdataset groups them (so positions match the manifest's counts). Members of other extensions
    are skipped unread; a duplicate or oversized member marks the sample ``"__bad__"`` instead of
    ending the shard. Raises (anything) where the tar itself is damaged."""
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            tar.members = []  # streaming: do not keep every header of a shard (memory stays flat)
            if not member.isreg():  # links and devices are no sample's data (webdataset skips them too)
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            ext = ext.lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext not in READ_KEYS:
                continue  # pickle payloads (.pyd, .pth, ...) and anything else: never read
            if ext in sample:
                sample.setdefault("__bad__", f"member {member.name} appears twice")
            elif member.size > member_limit(ext):
                sample.setdefault("__bad__", f"member {member.name} has {member.size} bytes, over the "
                                             f"{member_limit(ext)} allowed for .{ext}")
            else:
                data = tar.extractfile(member)
                sample[ext] = data.read() if data is not None else b""
    if sample is not None:
        yield sample


def read_tar(loc: storage.Location, start: int, stop: int, on_error: Callable[[str], None],
             expect_bytes: Optional[int] = None, seek: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Raw samples [start, stop) of one shard (bytes, nothing decoded), wherever it lives (see
    :mod:`data_prep.storage`). ``seek``: the byte offset where sample ``start`` begins (the shard's
    sample index), read from there instead of from sample 0; a seek that lands on no tar header
    is reported as an index that does not match and the shard is read from its start.

    A truncated or unreadable shard ends early and is reported, never raised (``tarfile`` stops
    silently when a file is cut inside a header, so a shard ending short of ``stop`` is reported
    too). A shard whose size, as the store reports it on opening, is not ``expect_bytes`` is reported
    and not read. A remote read that fails (a dropped connection, a timeout) is retried
    ``REMOTE_RETRIES`` times, resuming after the last sample given out."""
    where = storage.redact(loc)
    given = start  # samples of the shard before this one are not given out (before the range, or given already)
    seen = 0
    retries = REMOTE_RETRIES if storage.is_remote(loc) else 0
    attempt = 0
    while True:
        first = start if seek is not None else 0  # the sample the reading starts at
        seen = first
        try:
            with storage.open_read(loc) as f:
                size = storage.size_of(f)
                if expect_bytes is not None and size is not None and size != expect_bytes:
                    on_error(f"{size_mismatch(where, size, expect_bytes)}; re-copy it or re-index the folder")
                    return
                if seek is not None:
                    skip_bytes(f, seek)
                for seen, sample in enumerate(iter_tar_samples(f, where), start=first + 1):
                    if seen > given:
                        given = seen
                        yield sample
                    if seen >= stop:
                        return
            break  # the shard ended (short of stop: reported below)
        # Not just TarError/OSError: tarfile is not hardened against hostile bytes and raises e.g. TypeError
        # for a gzip stream cut right after its magic (tarfile._Stream._init_read_gz), zlib.error or
        # lzma.LZMAError for corrupt compressed data; remote stores raise their own types.
        except Exception as e:  # noqa: BLE001
            if seek is not None and seen == first:
                log.warning("data: the sample index of %s does not match it (no sample at byte %d: %s); reading "
                            "the shard from its start; rebuild the indexes with `python -m data_prep index "
                            "--samples-only FOLDER`", where, seek, type(e).__name__)
                seek = None
                continue
            if attempt < retries:
                attempt += 1
                log.warning("data: reading shard %s failed after %d samples (%s: %s); retry %d of %d",
                            where, seen, type(e).__name__, storage.redact(str(e))[:200], attempt, retries)
                time.sleep(RETRY_WAIT_S * attempt)
                continue
            on_error(f"shard {where} is truncated or unreadable after {max(seen, given)} samples: {type(e).__name__}: "
                     f"{storage.redact(str(e))[:300]}")
            return
    if seen < stop:
        on_error(f"shard {where} is truncated or unreadable: it ended after {seen} of {stop} samples")


def size_mismatch(where: str, size: int, listed: int) -> str:
    """The one wording of a shard whose size is not its manifest's (start-up listing or opening)."""
    return f"shard {where} has {size} bytes but the manifest lists {listed} (truncated or replaced since it was written?)"


def skip_bytes(f: BinaryIO, n: int) -> None:
    """Move a stream ``n`` bytes on: a seek where it can, else read and drop (HTTP, pipes)."""
    try:
        f.seek(n)
        return
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both; fsspec's HTTP stream: ValueError
        pass
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"the stream ended {n} bytes before the seek target")
        n -= len(chunk)


def decode_untrusted_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB image, after checking the format and size from the header alone."""
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    if max(image.size) > MAX_IMAGE_SIDE:
        raise ValueError(f"{image.size[0]}x{image.size[1]} px, a side over {MAX_IMAGE_SIDE}")
    image.load()  # decode now, so truncated files fail here and not later in the transform
    return to_rgb(image)


def sample_uid(raw: dict[str, Any], where: str) -> str:
    """The json's ``uid`` (the data contract), else the tar key (img2dataset shards have none)."""
    if "json" not in raw:
        return raw["__key__"]
    try:
        meta = json.loads(raw["json"])
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise ValueError(f"{where} has metadata (.json) that is not valid JSON: {type(e).__name__}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{where} has metadata (.json) that is a {type(meta).__name__}, not an object")
    uid = meta.get("uid", raw["__key__"])
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_CHARS:
        raise ValueError(f"{where} has an invalid uid in its .json (expected a short string)")
    return uid


def parse_sample(raw: dict[str, Any], transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, str, str]:
    """Raw sample -> (image (3, H, W), caption, uid); raises ValueError naming the sample, its shard
    and what is wrong."""
    where = f"sample {raw.get('__key__', '?')} of {raw.get('__url__', '?')}"
    if "__bad__" in raw:
        raise ValueError(f"{where}: {raw['__bad__']}")
    ext = next((k for k in IMAGE_KEYS if k in raw), None)
    if ext is None:
        raise ValueError(f"{where} has no image (expected one of {IMAGE_KEYS})")
    if "txt" not in raw:
        raise ValueError(f"{where} has no caption (.txt)")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: caption is not UTF-8: {e}") from e
    if not caption:
        raise ValueError(f"{where}: caption is empty")
    uid = sample_uid(raw, where)
    try:
        image = decode_untrusted_image(raw[ext])
    except Exception as e:  # PIL raises many types on corrupt data (OSError, SyntaxError, struct.error...)
        raise ValueError(f"{where}: image is corrupt: {type(e).__name__}: {e}") from e
    return transform(image), caption, uid
