"""Caption clean-up and blocklists: rewrite ``sample.caption``, then drop captions that hit a blocklist.

Scraped alt-texts carry markup (``<b>``, ``&amp;``), links and runs of whitespace that teach the
text tower nothing; this stage removes them *in place*, so later stages (length, language,
frequency) and the shard see the clean text. The clean-up runs in a fixed order: HTML tags, HTML
entities, URLs, the configured substitutions (in order), whitespace.

Blocklist words are matched case-insensitively as whole words or phrases (``"red car"`` matches
``"a Red  car."`` but not ``"a redcar"``); entries containing CJK characters match as substrings,
since CJK text has no spaces to mark word boundaries. Single-word entries (the bulk of a real
blocklist) are looked up in a set, so thousands of them cost one pass over the caption's words.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from data_prep.filters.base import Filter, Measures, Reject
from data_prep.filters.caption_length import CJK
from data_prep.sources.base import Sample

_HTML_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^<>]*>")
# Tags that end a line or a cell: replaced by a space so "a<br>b" does not become "ab".
_BLOCK_TAGS = frozenset("br p div li ul ol tr td th table h1 h2 h3 h4 h5 h6 hr blockquote section".split())
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"']+", re.I)
_WORD = re.compile(r"\w+")


def strip_html(text: str) -> str:
    """``text`` without HTML tags and comments, with entities (``&amp;``, ``&#233;``) decoded.

    A scan from ``<`` to ``<`` in linear time, where the regex ``<!--.*?-->|<tag...>`` it replaces
    took quadratic time on unclosed comments: 64 KB of ``<!--`` took 17 s, a 1 MB caption hours."""
    out, i, j = [], 0, text.find("<")
    comments = True  # False once a "<!--" has no "-->" after it: then no later one has either
    while j != -1:
        end, repl = -1, ""
        if comments and text.startswith("<!--", j):
            close = text.find("-->", j + 4)
            comments = close != -1
            end = close + 3 if comments else -1
        if end == -1 and (m := _HTML_TAG.match(text, j)):
            end, repl = m.end(), " " if m.group(2).lower() in _BLOCK_TAGS else ""
        if end == -1:
            j = text.find("<", j + 1)
            continue
        out += (text[i:j], repl)
        i = end
        j = text.find("<", i)
    out.append(text[i:])
    return html.unescape("".join(out))


def strip_urls(text: str) -> str:
    """``text`` without http(s)/ftp URLs and bare ``www.`` links."""
    return _URL.sub(" ", text)


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: invalid regex {pattern!r}: {e}") from None


@dataclass
class CaptionCleanConfig:
    strip_html: bool = True  # tags, comments and entities
    strip_urls: bool = True
    collapse_whitespace: bool = True  # runs of whitespace -> one space; strip both ends
    substitutions: list[list[str]] = field(default_factory=list)  # [pattern, replacement] pairs, in order
    blocklist_words: list[str] = field(default_factory=list)  # case-insensitive words/phrases (CJK: substrings)
    blocklist_patterns: list[str] = field(default_factory=list)  # regexes searched in the clean caption

    def __post_init__(self) -> None:
        for i, pair in enumerate(self.substitutions):
            if len(pair) != 2:
                raise ValueError(f"substitutions[{i}]: expected [pattern, replacement], got {list(pair)!r}")
            try:  # a bad group reference in the replacement (\2, \g<x>) is only found when substituting
                _compile(pair[0], f"substitutions[{i}]").sub(pair[1], "")
            except re.error as e:
                raise ValueError(f"substitutions[{i}]: invalid replacement {pair[1]!r}: {e}") from None
        for i, word in enumerate(self.blocklist_words):
            if not word.strip():
                raise ValueError(f"blocklist_words[{i}]: empty entry; give a word or phrase")
        for i, pattern in enumerate(self.blocklist_patterns):
            _compile(pattern, f"blocklist_patterns[{i}]")


class Blocklist:
    """Case-insensitive word/phrase matcher; ``find(text)`` returns the configured entry it hits."""

    def __init__(self, entries: list[str]) -> None:
        self.words: dict[str, str] = {}  # casefolded single word -> entry as configured
        self.others: list[str] = []  # phrases and CJK entries, in the order of the regex's groups
        branches = []
        for entry in entries:
            key = " ".join(entry.casefold().split())
            if _WORD.fullmatch(key) and not CJK.search(key):
                self.words.setdefault(key, entry)
                continue
            body = r"\s+".join(map(re.escape, key.split()))
            # Latin-style entries need word boundaries; CJK entries have none to need.
            branches.append(body if CJK.search(key) else rf"(?<!\w){body}(?!\w)")
            self.others.append(entry)
        self.regex = re.compile("|".join(f"({b})" for b in branches), re.I) if branches else None

    def find(self, text: str) -> str | None:
        folded = text.casefold()
        if self.words:
            for w in _WORD.findall(folded):
                if w in self.words:
                    return self.words[w]
        if self.regex is not None:
            m = self.regex.search(folded)
            if m:
                return self.others[m.lastindex - 1]
        return None


class CaptionCleanFilter(Filter):
    name = "caption_clean"
    Config = CaptionCleanConfig
    measure_types = {"caption_changed": bool, "blocklisted": str}

    def __init__(self, cfg: CaptionCleanConfig) -> None:
        super().__init__(cfg)
        self._subs = [(re.compile(p), r) for p, r in cfg.substitutions]
        self._blocklist = Blocklist(cfg.blocklist_words)
        self._patterns = [(p, re.compile(p)) for p in cfg.blocklist_patterns]

    def clean(self, text: str) -> str:
        """``text`` after the configured clean-up steps."""
        if self.cfg.strip_html:
            text = strip_html(text)
        if self.cfg.strip_urls:
            text = strip_urls(text)
        for pattern, replacement in self._subs:
            text = pattern.sub(replacement, text)
        if self.cfg.collapse_whitespace:
            text = " ".join(text.split())
        return text

    def measure(self, sample: Sample) -> Measures:
        original = sample.caption
        text = self.clean(original)
        sample.caption = text
        if not text.strip():  # nothing to measure: later stages and the shard would get no text
            raise Reject(f"empty_after_clean: nothing left of {original[:60]!r}")
        return {"caption_changed": text != original, "blocklisted": self._blocked(text)}

    def _blocked(self, text: str) -> str | None:
        word = self._blocklist.find(text)
        if word is not None:
            return f'word "{word}"'
        for source, pattern in self._patterns:
            if pattern.search(text):
                return f"pattern {source}"
        return None

    def reject_reason(self, measures: Measures) -> str | None:
        hit = measures["blocklisted"]
        return None if hit is None else f"blocklisted: {hit}"
