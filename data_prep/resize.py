"""Resize-on-write: what the worker does to each kept sample's image before writing it to a shard.

The modes are img2dataset's (so datasets built by either tool look alike):

- ``keep_ratio``: shorter side -> ``size``, aspect kept;
- ``keep_ratio_largest``: longer side -> ``size``, aspect kept;
- ``center_crop``: shorter side -> ``size``, then the centred ``size`` x ``size`` square;
- ``border``: longer side -> ``size``, then padded with white to ``size`` x ``size``.

With ``only_if_bigger`` an image that would have to be enlarged is written at its own size (not
cropped or padded either, as img2dataset's ``resize_only_if_bigger``). An image that needs no resize
and already has the requested format is written byte for byte as it came (no re-encode, no loss).

Speed (this is where img2dataset spends its CPU): JPEGs are decoded at a reduced DCT scale when the
target is much smaller (``images.decode`` with ``decode_need``), big downscales first shrink by an
integer factor (``reducing_gap``), a centre crop resamples only the cropped region, and transparent
images bound for JPEG are composited on white once, before resampling three bands instead of four.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import partial

from PIL import Image

from data_prep import images
from data_prep.sources.base import Sample

MODES = ("keep_ratio", "keep_ratio_largest", "center_crop", "border")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # config value -> PIL format
# PIL format -> shard extension of the formats a shard may hold as they are (MPO: a camera JPEG).
SHARD_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# Downscales: bicubic (antialiased, as every Pillow filter) after the reduced JPEG decode. On the
# Tux Paint photos to 256 px it is within 38.4 dB PSNR (min; mean 42.9) of a full decode + Lanczos,
# closer than img2dataset's OpenCV INTER_AREA output (min 35.2, mean 41.6), and 1 ms/img cheaper
# than Lanczos. Upscales: Lanczos, as img2dataset.
DOWNSCALE = Image.Resampling.BICUBIC
UPSCALE = Image.Resampling.LANCZOS
# Big downscales first reduce by an integer factor while the rest stays >= 3x the target: Pillow's
# doc calls the result indistinguishable from the plain filter, and it is several times faster.
REDUCING_GAP = 3.0
PNG_COMPRESS_LEVEL = 3  # zlib level: past 3, files shrink by a few % for twice the time
WHITE = 255


@dataclass
class ResizeConfig:
    size: int | None = None  # None: images are written as they came (re-encoded only to change format)
    mode: str = "keep_ratio"  # keep_ratio | keep_ratio_largest | center_crop | border
    only_if_bigger: bool = True  # never upscale (img2dataset's resize_only_if_bigger)
    format: str = "keep"  # keep | jpg | png | webp
    quality: int = 95  # jpg/webp quality

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"size: {self.size} is too small; use a pixel count >= 1, or null to keep sizes")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not a resize mode; allowed: {', '.join(MODES)}")
        if self.format != "keep" and self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not an output format; allowed: keep, {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality: {self.quality} is out of range; allowed: 1 to 100")


def scale_factor(original: tuple[int, int], cfg: ResizeConfig) -> float | None:
    """Factor applied to the whole image, or None when it keeps its size."""
    if cfg.size is None:
        return None
    w, h = original
    side = max(w, h) if cfg.mode in ("keep_ratio_largest", "border") else min(w, h)
    if side == cfg.size or (cfg.only_if_bigger and side < cfg.size):
        return None
    return cfg.size / side


def output_size(original: tuple[int, int], cfg: ResizeConfig) -> tuple[int, int]:
    """The (w, h) ``encode_for_shard`` writes for an image of size ``original``."""
    k = scale_factor(original, cfg)
    if k is None:
        return original
    if cfg.mode in ("center_crop", "border"):
        return (cfg.size, cfg.size)
    return _scaled(original, k)


def decode_need(cfg: ResizeConfig) -> images.SizeNeed | None:
    """What the written image needs of the decode (for ``images.decode``), None when nothing is
    resized. A ``partial``, not a lambda, so it pickles into worker processes."""
    return None if cfg.size is None else partial(_needed, cfg=cfg)


def encode_for_shard(sample: Sample, cfg: ResizeConfig) -> tuple[bytes, str, tuple[int, int]]:
    """``(encoded bytes, extension, (w, h) written)`` for ``sample``'s image under ``cfg``.

    Returns ``sample.image`` itself when the image keeps its size and its format (``keep``, or the
    requested one already); raises ``Reject`` when it cannot be decoded (or was not fetched)."""
    # Decoded even when the bytes are written as they are: a file no stage decoded (no image stage
    # configured) must still be readable before it reaches a shard. Stages leave it cached.
    im = images.decode(sample, need=decode_need(cfg))
    (w, h), fmt = images.original_size(im), im.format
    k = scale_factor((w, h), cfg)
    out_fmt = FORMATS[cfg.format] if cfg.format != "keep" else ("JPEG" if fmt == "MPO" else fmt)
    if out_fmt not in FORMATS.values():
        out_fmt = "PNG"  # GIF, BMP, TIFF...: a lossless format a shard may hold
    if k is None and SHARD_EXT.get(fmt) == SHARD_EXT[out_fmt]:
        return sample.image, SHARD_EXT[out_fmt], (w, h)
    # Composite / convert before resampling: three bands instead of four, and one conversion only.
    im = images.on_white(im) if out_fmt == "JPEG" else _resamplable(im)
    if k is not None:
        im = _resize(im, (w, h), k, cfg)
    out = io.BytesIO()
    if out_fmt == "PNG":
        im.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        im.save(out, format=out_fmt, quality=cfg.quality)
    return out.getvalue(), SHARD_EXT[out_fmt], im.size


def _resize(im: Image.Image, original: tuple[int, int], k: float, cfg: ResizeConfig) -> Image.Image:
    """``im`` (possibly a reduced decode of an ``original``-sized file) scaled by ``k``, cropped or padded."""
    w, h = original
    x0, y0, x1, y1 = images.draft_box(im)
    f = (x1 - x0) / w  # decoded pixels per original pixel (< 1 for a reduced JPEG decode)
    resample, gap = (DOWNSCALE, REDUCING_GAP) if k < 1 else (UPSCALE, None)
    if cfg.mode == "center_crop":
        m = min(w, h)  # the centred m x m square of the original becomes size x size
        box = ((w - m) / 2 * f, (h - m) / 2 * f, (w + m) / 2 * f, (h + m) / 2 * f)
        return im.resize((cfg.size, cfg.size), resample, box=box, reducing_gap=gap)
    scaled = im.resize(_scaled(original, k), resample, box=(x0, y0, x1, y1), reducing_gap=gap)
    if cfg.mode != "border":
        return scaled
    canvas = Image.new(scaled.mode, (cfg.size, cfg.size), (WHITE,) * len(scaled.getbands()))
    canvas.paste(scaled, ((cfg.size - scaled.width) // 2, (cfg.size - scaled.height) // 2))
    return canvas


def _resamplable(im: Image.Image) -> Image.Image:
    """``im`` in a mode Pillow resamples with a real filter (palette and 1-bit images only do nearest)."""
    if im.mode in ("RGB", "RGBA", "L", "LA", "I", "F", "I;16"):
        return im
    return im.convert("RGBA" if images.has_alpha(im) else "RGB")


def _scaled(original: tuple[int, int], k: float) -> tuple[int, int]:
    return (max(1, round(original[0] * k)), max(1, round(original[1] * k)))


def _needed(original: tuple[int, int], cfg: ResizeConfig) -> tuple[int, int]:
    k = scale_factor(original, cfg)
    if k is None:
        return original
    return (math.ceil(original[0] * k), math.ceil(original[1] * k))
