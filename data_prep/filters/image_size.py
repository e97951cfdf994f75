"""Image size filter: drop images too small to learn from or too elongated to survive a square crop."""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from data_prep.filters.base import Filter, Measures, Reject
from data_prep.sources.base import DECODE_ERRORS, Sample


@dataclass
class ImageSizeConfig:
    min_side: int = 16  # pixels, shorter side
    max_aspect: float = 3.0  # longer side / shorter side

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1.0 (long side / short side), got {self.max_aspect}")


class ImageSizeFilter(Filter):
    name = "image_size"
    Config = ImageSizeConfig
    measure_types = {"width": int, "height": int, "aspect_ratio": float}

    def measure(self, sample: Sample) -> Measures:
        # Full decode (not just the header) so truncated files are caught here, not in the trainer.
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                im.load()
                w, h = im.size
        except DECODE_ERRORS as e:
            raise Reject(f"decode_error: {type(e).__name__}: {e}") from e
        return {"width": w, "height": h, "aspect_ratio": max(w, h) / max(1, min(w, h))}

    def reject_reason(self, measures: Measures) -> str | None:
        short = min(measures["width"], measures["height"])
        if short < self.cfg.min_side:
            return f"too_small: shorter side {short} px < min_side {self.cfg.min_side}"
        if measures["aspect_ratio"] > self.cfg.max_aspect:
            return f"bad_aspect: {measures['aspect_ratio']:.2f} > max_aspect {self.cfg.max_aspect}"
        return None
