"""Caption length filter: drop empty, non-UTF-8, too short or too long captions."""
from __future__ import annotations

from dataclasses import dataclass

from data_prep.filters.base import Filter, Measures, Reject
from data_prep.sources.base import Sample


@dataclass
class CaptionLengthConfig:
    min_words: int = 1
    max_words: int = 64
    max_chars: int = 300

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")


class CaptionLengthFilter(Filter):
    name = "caption_length"
    Config = CaptionLengthConfig
    measure_types = {"caption_words": int, "caption_chars": int}

    def measure(self, sample: Sample) -> Measures:
        try:
            sample.caption.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: the source's bytes were not UTF-8
            raise Reject(f"caption_not_utf8: undecodable bytes at position {e.start} in {sample.caption[:40]!r}") from e
        return {"caption_words": len(sample.caption.split()), "caption_chars": len(sample.caption)}

    def reject_reason(self, measures: Measures) -> str | None:
        words, chars = measures["caption_words"], measures["caption_chars"]
        if words == 0:  # whatever min_words says: a sample without text teaches nothing
            return "empty_caption: no words (empty or whitespace only)"
        if words < self.cfg.min_words:
            return f"too_few_words: {words} < min_words {self.cfg.min_words}"
        if words > self.cfg.max_words:
            return f"too_many_words: {words} > max_words {self.cfg.max_words}"
        if chars > self.cfg.max_chars:
            return f"too_long: {chars} chars > max_chars {self.cfg.max_chars}"
        return None
