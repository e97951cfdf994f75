"""Caption length filter: drop empty, non-UTF-8, too short or too long captions, CJK-aware.

Length is measured three ways: characters, words and (with a tokenizer) sentencepiece tokens.
Chinese and Japanese are written without spaces, so a whitespace split would call a whole Chinese
sentence one word; here every CJK ideograph, kana or hangul syllable counts as one word, and CJK
punctuation separates words like a space does. ``min_cjk_chars``/``max_cjk_chars`` express
Wukong's rule (keep captions of 1 to 32 Chinese characters).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from data_prep.filters.base import Filter, Measures, Reject
from data_prep.sources.base import Sample

# Ideographs (unified, extensions A-H, compatibility, 々〆〇), kana (incl. half-width katakana),
# bopomofo and hangul (syllables and jamo): the characters that are each a word of their own in CJK
# text. The katakana block's punctuation (゠ and the middle dot ・) is left out.
CJK_CHARS = (
    "\u1100-\u11ff\u3005-\u3007\u3041-\u309f\u30a1-\u30fa\u30fc-\u30ff\u3105-\u312f"  # jamo, 々〆〇, kana, bopomofo
    "\u3131-\u318e\u31a0-\u31bf\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"  # jamo, bopomofo, kana, ideographs
    "\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff\uff66-\uff9f"  # hangul, compat. ideographs, half-width kana
    "\U00020000-\U0003134f"  # ideograph extensions B-H
)
CJK = re.compile(f"[{CJK_CHARS}]")
# CJK symbols/punctuation (、。「」…) and full-width ASCII punctuation: separators, not words.
_CJK_PUNCT = "\u3000-\u303f\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_WORD_SEPARATORS = re.compile(f"[{CJK_CHARS}{_CJK_PUNCT}]")


def count_cjk(text: str) -> int:
    """Number of CJK ideographs, kana and hangul characters in ``text``."""
    return len(CJK.findall(text))


def count_words(text: str, cjk: int | None = None) -> int:
    """Whitespace-separated words, where each CJK character is one word and CJK punctuation separates
    (``cjk``: ``count_cjk(text)`` when the caller already has it)."""
    return (count_cjk(text) if cjk is None else cjk) + len(_WORD_SEPARATORS.sub(" ", text).split())


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    """The sentencepiece model at ``path``, loaded once per process (workers call this per sample)."""
    return spm.SentencePieceProcessor(model_file=path)


def _check_range(lo_name: str, lo: int | None, hi_name: str, hi: int | None) -> None:
    for name, value in ((lo_name, lo), (hi_name, hi)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or null (no limit), got {value}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{lo_name} ({lo}) must be <= {hi_name} ({hi})")


@dataclass
class CaptionLengthConfig:
    min_words: int = 1
    max_words: int = 64
    min_chars: int = 0
    max_chars: int = 300
    min_cjk_chars: int | None = None  # Wukong: 1 (with max_cjk_chars 32); null = no limit
    max_cjk_chars: int | None = None
    min_tokens: int | None = None  # needs ``tokenizer``; null = no limit
    max_tokens: int | None = None  # e.g. the text tower's context length minus bos/eos
    tokenizer: str | None = None  # path to a sentencepiece .model; enables the ``caption_tokens`` measure

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        _check_range("min_chars", self.min_chars, "max_chars", self.max_chars)
        _check_range("min_cjk_chars", self.min_cjk_chars, "max_cjk_chars", self.max_cjk_chars)
        _check_range("min_tokens", self.min_tokens, "max_tokens", self.max_tokens)
        if self.tokenizer is None:
            if self.min_tokens is not None or self.max_tokens is not None:
                raise ValueError("min_tokens/max_tokens: need tokenizer (path to a sentencepiece .model)")
            return
        if not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer: {self.tokenizer} is not a file; give the path of a sentencepiece .model")
        try:
            load_tokenizer(self.tokenizer)
        except (OSError, RuntimeError) as e:  # fail at config time, not in the middle of a build
            raise ValueError(f"tokenizer: {self.tokenizer} is not a sentencepiece model ({e})") from None


class CaptionLengthFilter(Filter):
    name = "caption_length"
    Config = CaptionLengthConfig
    measure_types = {"caption_words": int, "caption_chars": int, "caption_cjk_chars": int, "caption_tokens": int}

    def measure(self, sample: Sample) -> Measures:
        text = sample.caption
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: the source's bytes were not UTF-8
            raise Reject(f"caption_not_utf8: undecodable bytes at position {e.start} in {text[:40]!r}") from e
        cjk = count_cjk(text)
        out: Measures = {"caption_words": count_words(text, cjk),
                         "caption_chars": len(text)}
        # Optional measures are recorded only when configured, so a run without CJK limits or a
        # tokenizer does not carry always-zero / always-null columns.
        if self.cfg.min_cjk_chars is not None or self.cfg.max_cjk_chars is not None:
            out["caption_cjk_chars"] = cjk
        if self.cfg.tokenizer is not None:
            out["caption_tokens"] = len(load_tokenizer(self.cfg.tokenizer).encode(text))
        return out

    def reject_reason(self, measures: Measures) -> str | None:
        cfg = self.cfg
        words, chars = measures["caption_words"], measures["caption_chars"]
        if words == 0:  # whatever min_words says: a sample without text teaches nothing
            return "empty_caption: no words (empty or whitespace only)"
        if words < cfg.min_words:
            return f"too_few_words: {words} < min_words {cfg.min_words}"
        if words > cfg.max_words:
            return f"too_many_words: {words} > max_words {cfg.max_words}"
        if chars > cfg.max_chars:
            return f"too_long: {chars} chars > max_chars {cfg.max_chars}"
        if chars < cfg.min_chars:
            return f"too_short: {chars} chars < min_chars {cfg.min_chars}"
        return _bounds(measures.get("caption_cjk_chars"), cfg.min_cjk_chars, cfg.max_cjk_chars, "cjk_chars") \
            or _bounds(measures.get("caption_tokens"), cfg.min_tokens, cfg.max_tokens, "tokens")


def _bounds(value: int | None, lo: int | None, hi: int | None, what: str) -> str | None:
    """``too_few_<what>`` / ``too_many_<what>`` when ``value`` is outside [lo, hi] (None: no bound)."""
    if value is None:
        return None
    if lo is not None and value < lo:
        return f"too_few_{what}: {value} < min_{what} {lo}"
    if hi is not None and value > hi:
        return f"too_many_{what}: {value} > max_{what} {hi}"
    return None
