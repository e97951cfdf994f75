"""Language filter: identify each caption's language with py3langid and keep the allowed ones.

py3langid's model ships inside its wheel (nothing is downloaded). It is loaded once per process
(about half a second) and then classifies a caption in tens of microseconds; its normalised
probabilities make ``lang_score`` comparable across captions of different lengths. The detected
code also becomes ``sample.meta["lang"]``, the shard json's ``lang`` (the data contract).
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from data_prep.filters.base import Filter, Measures
from data_prep.sources.base import Sample

UNDETERMINED = "und"  # BCP 47 / ISO 639-2 code for text without any language signal (digits, emoji)
# Language is settled long before this; the cap bounds the cost of pathological multi-KB captions.
MAX_CLASSIFY_CHARS = 2000


@functools.lru_cache(maxsize=1)
def identifier() -> LanguageIdentifier:
    """The process-wide identifier (normalised probabilities), loaded on first use."""
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@functools.lru_cache(maxsize=1)
def _no_evidence_score() -> float:
    """The top probability when no n-gram matched: uniform over the model's columns, where a label
    with alias columns (``srl`` -> ``sr``) sums them, so the top is that label's share."""
    classes = identifier().nb_classes
    return max(Counter(classes).values()) / len(classes)


def known_languages() -> list[str]:
    """Codes the identifier can answer (mostly ISO 639-1, a few ISO 639-3 such as ``yue``)."""
    return identifier().labels


def identify(text: str) -> tuple[str, float]:
    """``(code, probability)`` of the most likely language of ``text``; ``("und", 0.0)`` when the
    text has no letters or gives the model no evidence (a uniform distribution)."""
    text = text[:MAX_CLASSIFY_CHARS]
    if not any(c.isalpha() for c in text):
        return UNDETERMINED, 0.0
    lang, score = identifier().classify(text)
    if score <= _no_evidence_score() * 1.001:  # argmax of a uniform distribution: not a decision
        return UNDETERMINED, 0.0
    return lang, min(1.0, max(0.0, score))


@dataclass
class LanguageConfig:
    # Codes to keep, e.g. [en]; empty = any. Short Chinese captions are often identified as Wu or
    # Cantonese, so a Chinese dataset lists [zh, wuu, yue].
    allowed: list[str] = field(default_factory=list)
    min_score: float = 0.0  # probability of the detected language, in [0, 1]

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.allowed:
            known = set(known_languages())
            unknown = [code for code in self.allowed if code not in known]
            if unknown:
                raise ValueError(f"allowed: {', '.join(map(repr, unknown))} not known to py3langid; "
                                 f"allowed codes: {', '.join(sorted(known))}")


class LanguageFilter(Filter):
    name = "language"
    Config = LanguageConfig
    measure_types = {"lang": str, "lang_score": float}

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__(cfg)
        self._allowed = frozenset(cfg.allowed)

    def measure(self, sample: Sample) -> Measures:
        lang, score = identify(sample.caption)
        sample.meta["lang"] = lang
        return {"lang": lang, "lang_score": score}

    def reject_reason(self, measures: Measures) -> str | None:
        lang, score = measures["lang"], measures["lang_score"]
        if self._allowed and lang not in self._allowed:
            return f"wrong_language: {lang} not in [{', '.join(self.cfg.allowed)}]"
        if score < self.cfg.min_score:
            return f"uncertain_language: {lang} with probability {score:.2f} < min_score {self.cfg.min_score}"
        return None
