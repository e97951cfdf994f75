"""Decoding shared by every image stage: once per sample, with a guard against decompression bombs.

The pixel count is read from the header and checked *before* pixels are allocated, so a 1 KB file
claiming 100k x 100k pixels is rejected instead of exhausting memory. Decode failures raise
``Reject`` with a reason code, which the builder records per sample.

A caller that knows how small the image will end up (resize-on-write) passes ``need``: JPEGs are
then decoded at a reduced DCT scale (``Image.draft``: 1/2, 1/4 or 1/8), which skips most of the
decoding work. The original size stays available from the header (``original_size``), so stages
still measure what the file holds.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

from PIL import Image

from data_prep.sources.base import DECODE_ERRORS, Sample

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (about 0.25 GB of RGB24)
# The only PIL parsers untrusted bytes reach (JPEG's also opens camera MPOs). Without this list PIL
# picks a parser by content whatever the file is called: EPS bytes in a ``.png`` would run Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Original (w, h) -> the smallest (w, h) the caller will use; the decode may be reduced down to it.
SizeNeed = Callable[[tuple[int, int]], tuple[int, int]]
# Draft down to the needed size itself, not 2x as Pillow's thumbnail: DCT-domain scaling is a proper
# low-pass, and on the Tux Paint photos (to 256 px) the result stays within 41.6 dB PSNR of a full
# decode + Lanczos while taking half the time.
DRAFT_GAP = 1
_ORIGINAL_SIZE = "data_prep.original_size"  # keys in ``Image.info`` of a cached decode
_BOX = "data_prep.draft_box"


def decode(sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS, need: SizeNeed | None = None) -> Image.Image:
    """The fully loaded image of ``sample`` (cached on ``sample.decoded``); raises ``Reject``:
    ``no_image`` (nothing fetched), ``empty_file``, ``too_many_pixels`` or ``decode_error``.

    With ``need``, a JPEG may be decoded reduced, but never below ``need(original size)``; a cached
    decode that is smaller than a later caller's ``need`` is decoded again at the needed scale."""
    cached = sample.decoded
    if cached is not None and (need is None or _covers(cached, need)):
        return cached
    if sample.image is None:
        raise _reject("no_image: the image was not fetched")
    if len(sample.image) == 0:
        raise _reject("empty_file: zero-byte image")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the policy; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(sample.image), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # beyond twice PIL's limit: refused inside Image.open
        raise _reject(f"too_many_pixels: {e}") from e
    except Image.UnidentifiedImageError as e:  # its message holds the buffer's address: not reproducible
        raise _reject(f"decode_error: UnidentifiedImageError: not a {', '.join(IMAGE_FORMATS)} image") from e
    except DECODE_ERRORS as e:
        raise _reject(f"decode_error: {type(e).__name__}: {e}") from e
    w, h = im.size
    if w * h > max_pixels:
        raise _reject(f"too_many_pixels: {w}x{h} = {w * h} > max_pixels {max_pixels}")
    box = (0.0, 0.0, float(w), float(h))
    if need is not None and im.format == "JPEG":
        nw, nh = need((w, h))
        drafted = im.draft(None, (max(1, nw) * DRAFT_GAP, max(1, nh) * DRAFT_GAP))
        box = drafted[1] if drafted else box
    try:
        im.load()  # full decode (not just the header): truncated files are caught here
    except DECODE_ERRORS as e:
        raise _reject(f"decode_error: {type(e).__name__}: {e}") from e
    im.info[_ORIGINAL_SIZE], im.info[_BOX] = (w, h), box
    sample.decoded = im
    return im


def original_size(im: Image.Image) -> tuple[int, int]:
    """The size the file declares, also for a decode reduced by ``need``."""
    return im.info.get(_ORIGINAL_SIZE, im.size)


def draft_box(im: Image.Image) -> tuple[float, float, float, float]:
    """The region of ``im`` that holds the original picture, for resampling: a JPEG decoded at 1/s
    has ``ceil(w / s)`` columns, the last one only partly covered, so the picture spans ``w / s``."""
    return im.info.get(_BOX, (0.0, 0.0, float(im.size[0]), float(im.size[1])))


def has_alpha(im: Image.Image) -> bool:
    """True when ``im`` carries transparency (an alpha band or a transparent palette entry)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def on_white(im: Image.Image) -> Image.Image:
    """``im`` as opaque RGB (or L), transparent parts composited on white; unchanged if opaque RGB/L."""
    if not has_alpha(im):
        return im if im.mode in ("RGB", "L") else im.convert("RGB")
    gray = im.mode in ("LA", "La") or (im.mode == "L" and "transparency" in im.info)
    rgba = im if im.mode in ("RGBA", "LA") else im.convert("LA" if gray else "RGBA")
    canvas = Image.new("L" if gray else "RGB", rgba.size, 255 if gray else (255, 255, 255))
    canvas.paste(rgba, mask=rgba)  # the source's own alpha as the mask: no converted copy needed
    return canvas


def _reject(reason: str) -> Exception:
    # Imported here: importing data_prep.filters loads every stage module, some of which import
    # this module, so a module-level import would be circular when this module is imported first.
    from data_prep.filters.base import Reject

    return Reject(reason)


def _covers(im: Image.Image, need: SizeNeed) -> bool:
    nw, nh = need(original_size(im))
    return im.size == original_size(im) or (im.size[0] >= nw and im.size[1] >= nh)
