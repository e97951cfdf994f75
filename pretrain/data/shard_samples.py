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
import tarfile
from typing import Any, BinaryIO, Callable, Iterator

import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext  # key/extension split: samples group as in webdataset

from pretrain.data.transforms import to_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
READ_KEYS = frozenset({*IMAGE_KEYS, "txt", "json"})  # the only members whose bytes are read
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL plugins allowed: never EPS (Ghostscript) or other exotic parsers
MAX_MEMBER_BYTES = {"txt": 64 << 10, "json": 1 << 20}  # larger: not a caption / metadata but junk
MAX_IMAGE_BYTES = 64 << 20
# Bounds decoding (8192^2 px) and, as transforms.to_rgb pads to a square, also its output: a 1 x 60000
# PNG is a few hundred bytes but would pad to a 60000^2 canvas (10 GB).
MAX_IMAGE_SIDE = 8192
MAX_UID_CHARS = 256


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


def read_tar(path: str, start: int, stop: int, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples [start, stop) of one shard (bytes, nothing decoded). A truncated or unreadable
    shard ends early and is reported, never raised. (``tarfile`` stops silently when a file is cut
    inside a header, so a shard ending short of ``stop`` is reported too.)"""
    read = 0
    try:
        with open(path, "rb") as f:
            for read, sample in enumerate(iter_tar_samples(f, path), start=1):
                if read > start:
                    yield sample
                if read >= stop:
                    return
    # Not just TarError/OSError: tarfile is not hardened against hostile bytes and raises e.g. TypeError
    # for a gzip stream cut right after its magic (tarfile._Stream._init_read_gz), zlib.error or
    # lzma.LZMAError for corrupt compressed data. Whatever it raises, the shard is unreadable from there.
    except Exception as e:
        on_error(f"shard {path} is truncated or unreadable after {read} samples: {type(e).__name__}: {e}")
        return
    if read < stop:
        on_error(f"shard {path} is truncated or unreadable: it ended after {read} of {stop} samples")


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
