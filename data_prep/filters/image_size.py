"""Image size stage: drop files too small to learn from, decompression bombs, undecodable files and
images too elongated to survive a square crop.

Wukong's rule (both sides > 200 px, long/short side <= 3) is ``min_side: 201, max_aspect: 3.0``:
``min_side`` bounds the shorter side, so it bounds both. LAION/DataComp-style size rules are the same
two numbers with other values.

Measures (recorded whatever the verdict): ``width`` and ``height`` of the original file (from its
header, even when the decode is reduced for resize-on-write), ``aspect_ratio`` (long / short side)
and ``image_bytes`` (length of the encoded file). Reasons: ``empty_file``, ``too_many_pixels``
and ``decode_error`` (the file cannot be measured), ``too_few_bytes``, ``too_small``, ``bad_aspect``.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_prep import images
from data_prep.filters.base import Filter, Measures
from data_prep.sources.base import Sample


@dataclass
class ImageSizeConfig:
    min_side: int = 16  # pixels, shorter side (so both sides); Wukong: 201
    max_aspect: float = 3.0  # longer side / shorter side; Wukong: 3.0
    min_bytes: int = 0  # encoded file size; tiny files are mostly placeholders and spacer GIFs
    # Checked from the header before any pixel is allocated. PIL itself refuses more than twice
    # its own limit (Image.MAX_IMAGE_PIXELS) whatever this says.
    max_pixels: int = images.DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side: {self.min_side} is too small; use a pixel count >= 1")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect: {self.max_aspect} < 1.0; it is long side / short side, so >= 1.0")
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes: {self.min_bytes} is negative; use 0 (no minimum) or a byte count")
        if self.max_pixels < self.min_side ** 2:
            raise ValueError(f"max_pixels: {self.max_pixels} would reject every image; use at least "
                             f"min_side**2 = {self.min_side ** 2}")


class ImageSizeFilter(Filter):
    name = "image_size"
    Config = ImageSizeConfig
    measure_types = {"width": int, "height": int, "aspect_ratio": float, "image_bytes": int}
    needs_image = True
    # What later consumers need of the pixels (``resize.decode_need(cfg.resize)``): set by the
    # worker so this stage's decode, the one every later stage reuses, can be a reduced JPEG decode.
    decode_need: images.SizeNeed | None = None

    def measure(self, sample: Sample) -> Measures:
        # A full decode (not just the header) so truncated files are caught here, not in the trainer.
        im = images.decode(sample, self.cfg.max_pixels, self.decode_need)
        w, h = images.original_size(im)
        return {"width": w, "height": h, "aspect_ratio": max(w, h) / max(1, min(w, h)),
                "image_bytes": len(sample.image or b"")}

    def reject_reason(self, measures: Measures) -> str | None:
        if measures["image_bytes"] < self.cfg.min_bytes:
            return f"too_few_bytes: {measures['image_bytes']} bytes < min_bytes {self.cfg.min_bytes}"
        short = min(measures["width"], measures["height"])
        if short < self.cfg.min_side:
            return f"too_small: shorter side {short} px < min_side {self.cfg.min_side}"
        if measures["aspect_ratio"] > self.cfg.max_aspect:
            return f"bad_aspect: {measures['aspect_ratio']:.2f} > max_aspect {self.cfg.max_aspect}"
        return None
