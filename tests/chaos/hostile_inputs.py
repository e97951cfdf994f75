"""Hostile inputs for the data_prep fuzz tests (tests/chaos/test_chaos_fuzz_prep.py): hypothesis
strategies for images, caption bytes and tar members, the damage applied to whole tars, the reason
codes a rejection may carry, and a watchdog that turns a hang into a failure."""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import signal
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from tests import stamps

HANG_S = 20  # far above any example's real time (< 1 s): only a hang reaches it
# deadline=None: a hang never returns, so hypothesis' deadline could not report it (the watchdog
# does), and on 2 shared cores a timing deadline would only make the suite flaky. derandomize: the
# same examples on every CI run, no example database.
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STAMP = stamps.plain(1)[0].path  # a real stamp, whatever the release calls it
MAX_PIXELS = 1_000_000  # bombs are refused from the header; real decodes stay small and fast
SOURCE_CODES = {"unsafe_path", "unsafe_member", "pickle_payload", "member_too_large", "duplicate_key",
                "duplicate_uid", "bad_json", "no_image", "no_caption", "truncated_tar"}
IMAGE_CODES = {"empty_file", "too_many_pixels", "decode_error", "too_small", "bad_aspect", "too_few_bytes"}
TEXT_CODES = {"caption_not_utf8", "empty_after_clean", "empty_caption", "too_few_words", "too_many_words",
              "too_long", "too_short", "blocklisted", "wrong_language", "uncertain_language"}


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so no ``except Exception`` in the code under test eats it."""


@contextlib.contextmanager
def watchdog(what: str, seconds: float = HANG_S) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise Hang(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---- real images, made in-process from a Tux Paint stamp ---------------------------------------------

def _encode(im: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


_BASE = Image.open(STAMP).convert("RGB").resize((40, 48))
IMAGES = {fmt: _encode(_BASE, fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\nnewpath 0 0 moveto 20 20 lineto stroke\nshowpage\n"
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM", b"II*\0", b"%!PS"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (valid CRC) declares ``width`` x ``height`` but whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def hostile_image(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "cut", "flipped", "magic", "bomb", "noise", "empty", "eps"]))
    valid = IMAGES[draw(st.sampled_from(sorted(IMAGES)))]
    if kind == "valid":
        return valid
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flipped":
        data = bytearray(valid)
        for at, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8)):
            data[at] ^= value
        return bytes(data)
    if kind == "magic":  # another format's signature in front of the data
        magic = draw(st.sampled_from(MAGICS))
        return magic + valid[len(magic):]
    if kind == "bomb":
        return png_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    if kind == "noise":
        return draw(st.binary(max_size=2048))
    return b"" if kind == "empty" else EPS


# ---- captions as raw bytes ------------------------------------------------------------------------------

FRAGMENTS = [b"a bird", b"\xff\xfe", b"\x00", b"\x1b[31m", b"\r\n", b"\t", "\u202e\u2066\u200f".encode(),
             "\ufeff".encode(), b"\xed\xa0\x80", "鸟".encode(), "e\u0301".encode(), b"<!--", b"<b>", b"&amp;",
             b"http://x.org/a", b"www.", b" ", "\U0001f426".encode(), b"\xc3", b"\x80"]


def _huge(fragment: bytes) -> st.SearchStrategy[bytes]:
    """``fragment`` repeated up to 300 KB (sizes spread out: hypothesis alone favours small counts)."""
    return st.sampled_from([1, 2_000, 40_000, 300_000]).map(lambda size: fragment * max(1, size // len(fragment)))


hostile_caption = st.one_of(
    st.binary(max_size=300),
    st.text(st.characters(exclude_categories=()), max_size=120).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join),
    st.sampled_from(FRAGMENTS).flatmap(_huge),
)

hostile_json = st.one_of(
    st.just(b'{"uid": "00000000000000000000000000000001", "width": 40, "height": 48, "lang": "en"}'),
    st.sampled_from([b"{not json", b"[1, 2]", b'"x"', b"null", b"\xff\xfe{}", b'{"url": "\\ud800"}',
                     b'{"width": "x", "height": true, "original_width": 1e308, "lang": [1], "uid": 7}',
                     b'{"original_width": -5, "original_height": 99999999999999999999, "url": {"a": 1}}',
                     b"[" * 100_000, b'{"a":' * 50_000]),
    st.binary(max_size=200),
)

# ---- tars -------------------------------------------------------------------------------------------------

NAMES = ["a.png", "a.txt", "a.json", "a.jpg", "a.webp", "b.png", "b.txt", "A.PNG", "a.TXT", "a.pyd", "a.pickle",
         "b.pth", "../x.png", "/etc/x.png", "a/../../x.txt", "..", ".", "x", ".hidden.png", "a.b.txt", "\udcff.png",
         "\u202ea.txt", "C:\\x.png", "a\\..\\x.txt", "d/a.png", "d/a.txt", "a\0b.png", "n" * 200 + ".png"]
TYPES = [tarfile.REGTYPE] * 8 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z"]
HUGE_SIZES = [b"\x80" + (2**88 - 1).to_bytes(11, "big"), b"77777777777\0", b"\xff" * 12, b"\x80" + (1 << 40).to_bytes(11, "big")]


def member_data(name: str) -> st.SearchStrategy[bytes]:
    suffix = name.rpartition(".")[2].lower()
    if suffix in ("png", "jpg", "webp"):
        return hostile_image()
    if suffix == "txt":
        return hostile_caption
    if suffix == "json":
        return hostile_json
    if suffix in ("pyd", "pickle", "pth"):
        return st.just(b"PICKLE")  # replaced by a real Trap payload once the example's folder is known
    return st.binary(max_size=64)


member = st.tuples(st.one_of(st.sampled_from(NAMES), st.builds("{}.{}".format, st.text("ab./\\\0\udcff", max_size=5),
                                                                st.sampled_from(["png", "txt", "json", "pyd", ""]))),
                   st.sampled_from(TYPES)).flatmap(lambda nt: st.tuples(st.just(nt[0]), st.just(nt[1]), member_data(nt[0])))
# A whole sample (image, caption, json under one key), so that most examples reach the code that
# judges complete samples and not only the member checks.
sample_members = st.sampled_from(["a", "b", "c", "d/e"]).flatmap(lambda key: st.tuples(
    *(st.tuples(st.just(f"{key}.{ext}"), st.just(tarfile.REGTYPE), member_data(f"x.{ext}")) for ext in ("png", "txt", "json"))))
tar_members = st.lists(st.one_of(sample_members, member.map(lambda m: (m,))), max_size=8).map(
    lambda groups: [m for group in groups for m in group])


def build_tar(members: list[tuple[str, bytes, bytes]], fmt: int, trap: bytes) -> tuple[bytes, list[int]]:
    """The tar's bytes and each header's offset; members tarfile refuses to write are left out."""
    out, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, kind, data in members:
            data = trap if data == b"PICKLE" else data
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE) else 0
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            at = out.tell()
            try:
                tf.addfile(info, io.BytesIO(data) if info.size else None)
            except (ValueError, UnicodeError):
                out.seek(at)
                out.truncate()
                continue
            offsets.append(at)
    return out.getvalue(), offsets


def set_size(raw: bytes, at: int, field: bytes) -> bytes:
    """``raw`` with the size field of the header at ``at`` replaced, and the checksum made valid again."""
    block = bytearray(raw[at: at + 512])
    if len(block) < 512:
        return raw
    block[124:136] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return raw[:at] + bytes(block) + raw[at + 512:]


COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
damage = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("size"), st.integers(0, 30), st.sampled_from(HUGE_SIZES)),
    st.tuples(st.just("compress"), st.sampled_from(sorted(COMPRESS)), st.floats(0.2, 1)),
    st.tuples(st.just("noise"), st.binary(max_size=4096)),
)


def apply_damage(raw: bytes, offsets: list[int], how: tuple) -> bytes:
    kind = how[0]
    if kind == "cut":
        return raw[: int(len(raw) * how[1])]
    if kind == "flip":
        data = bytearray(raw)
        for where, value in how[1]:
            data[min(int(len(data) * where), len(data) - 1)] ^= value
        return bytes(data)
    if kind == "size" and offsets:
        return set_size(raw, offsets[how[1] % len(offsets)], how[2])
    if kind == "compress":
        packed = COMPRESS[how[1]](raw)
        return packed[: max(1, int(len(packed) * how[2]))]
    if kind == "noise":
        return how[1]
    return raw
