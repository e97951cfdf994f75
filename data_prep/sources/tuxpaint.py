"""Tux Paint stamps (``apt-get install tuxpaint-stamps-default``): clip-art PNGs with human captions.

Each ``NAME.png`` has its English caption on line 1 of ``NAME.txt`` (translations follow). Variant
images (``NAME_mirror.png``, ``NAME-1.png``, ``NAME2.png``) often share their base stamp's text, so
the caption falls back to the base name; with no text at all the item is rejected as ``no_caption``.
Images keep their original bytes (and alpha: the trainer composites on white) unless larger than
``max_side``, in which case they are downscaled so shards stay small and decoding stays cheap.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from data_prep.sources.base import DECODE_ERRORS, Rejected, Sample, Source, SourceConfig

# Suffixes that mark a variant of another stamp: "_mirror", "-1", "_2", "2".
_VARIANT_SUFFIX = re.compile(r"(_mirror|[-_]?\d+)$")


def caption_file(png: Path) -> Path | None:
    """``NAME.txt`` beside ``png``, else the txt of the base stamp it is a variant of, else None."""
    stem = png.stem
    while True:
        txt = png.with_name(stem + ".txt")
        if txt.exists():
            return txt
        m = _VARIANT_SUFFIX.search(stem)
        if m is None or m.start() == 0:
            return None
        stem = stem[: m.start()]


def read_caption(txt: Path) -> str:
    """Line 1 of a stamp description, stripped. Bytes that are not UTF-8 survive as surrogates so the
    caption filter can reject them by name instead of this reader crashing or silently mangling them."""
    text = txt.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def shrink_png(data: bytes, max_side: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """``(png bytes, (w, h), (original w, original h))``: the input unchanged when it already fits."""
    with Image.open(io.BytesIO(data)) as im:
        original = im.size
        if max(original) <= max_side:
            return data, original, original
        scale = max_side / max(original)
        size = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
        # Palette and 1-bit images can only be resized with NEAREST; convert so LANCZOS applies,
        # keeping transparency as an alpha channel.
        if im.mode in ("P", "1"):
            im = im.convert("RGBA" if im.mode == "P" and "transparency" in im.info else "RGB")
        out = io.BytesIO()
        im.resize(size, Image.Resampling.LANCZOS).save(out, format="PNG")
        return out.getvalue(), size, original


@dataclass
class TuxPaintConfig(SourceConfig):
    root: str = "/usr/share/tuxpaint/stamps"
    heldout_fraction: float = 0.15  # heldout stamps are the image-text retrieval benchmark
    max_side: int = 256  # longer image side above this is downscaled (aspect kept)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")


class TuxPaint(Source):
    name = "tuxpaint"
    Config = TuxPaintConfig
    debian_package = "tuxpaint-stamps-default"

    def __init__(self, cfg: TuxPaintConfig, name: str | None = None) -> None:
        super().__init__(cfg, name)
        # Sorted by relative path so the order (and what `limit` keeps) is the same on every machine.
        # SVG stamps are skipped: there is no rasterizer here.
        pngs = sorted(self.root.rglob("*.png"), key=lambda p: p.relative_to(self.root).as_posix())
        self.pngs = pngs[: self._limited(len(pngs))]

    def __len__(self) -> int:
        return len(self.pngs)

    def iter_range(self, start: int, stop: int) -> Iterator[Sample | Rejected]:
        for png in self.pngs[start:stop]:
            rel = png.relative_to(self.root)
            source_id = rel.as_posix()
            uid = self.uid(source_id)
            txt = caption_file(png)
            if txt is None:
                yield Rejected(uid=uid, source=self.label, source_id=source_id, reason="no_caption")
                continue
            data = png.read_bytes()
            try:
                data, (w, h), (ow, oh) = shrink_png(data, self.cfg.max_side)
            except DECODE_ERRORS:
                w = h = ow = oh = None  # keep the bytes: the image_size filter records the decode error
            yield Sample(
                uid=uid, source=self.label, source_id=source_id, image=data, image_ext="png",
                caption=read_caption(txt),
                meta={"width": w, "height": h, "original_width": ow, "original_height": oh, "lang": "en",
                      "category": rel.parts[0] if len(rel.parts) > 1 else ""},
            )
