"""Caption frequency filter (global): drop captions that occur more than ``max_count`` times.

Boilerplate alt-texts ("image", "product photo", a site's name) repeat thousands of times and pair
one text with unrelated images, which a contrastive loss cannot learn from. Wukong and ALIGN drop
every pair whose text occurs more than 10 times in the corpus: *all* its occurrences, not just the
extras, since no copy is better than another.

Workers only measure a short hash of the normalised caption (``caption_key``); the merge counts the
keys of the samples still alive over the whole dataset in one vectorised pass (pyarrow's hash
table + numpy), so tens of millions of rows cost seconds, not a Python loop per row.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.filters.base import Filter, Measures
from data_prep.sources.base import Sample

KEY_BYTES = 8  # 64-bit keys: a chance collision among 1e9 distinct captions is ~3%, and costs one count


def normalise(caption: str) -> str:
    """The form in which two captions count as the same: NFKC, case-folded, whitespace collapsed,
    punctuation stripped from both ends ("A cat." == "a  cat" == "A CAT!")."""
    text = " ".join(unicodedata.normalize("NFKC", caption).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def caption_key(caption: str) -> str:
    """Hex blake2b digest (``KEY_BYTES`` bytes) of ``normalise(caption)``; stable across runs and machines."""
    # surrogatepass: a caption with undecodable bytes still gets a (stable) key instead of an error
    data = normalise(caption).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=KEY_BYTES).hexdigest()


@dataclass
class CaptionFrequencyConfig:
    max_count: int = 10  # Wukong, ALIGN: drop captions occurring more than 10 times

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1 (occurrences allowed per caption), got {self.max_count}")


class CaptionFrequencyFilter(Filter):
    name = "caption_frequency"
    Config = CaptionFrequencyConfig
    measure_types = {"caption_key": str}

    @property
    def is_global(self) -> bool:
        return True

    def measure(self, sample: Sample) -> Measures:
        return {"caption_key": caption_key(sample.caption)}

    def global_reasons(self, table: pa.Table, alive: np.ndarray) -> list[str | None]:
        alive = np.asarray(alive, dtype=bool)
        if alive.shape != (table.num_rows,):
            raise ValueError(f"alive has shape {alive.shape}, expected ({table.num_rows},)")
        rows = np.flatnonzero(alive)  # (A,) indices of the rows that count
        reasons = np.full(table.num_rows, None, dtype=object)
        if rows.size == 0 or "caption_key" not in table.column_names:  # nothing counts, or nothing measured
            return reasons.tolist()
        keys = table.column("caption_key").take(pa.array(rows)).combine_chunks()
        # Hash-based grouping, O(A): indices into the distinct keys; null (unmeasured) -> -1.
        codes = pc.fill_null(pc.dictionary_encode(keys).indices, -1).to_numpy()  # (A,)
        measured = codes >= 0
        counts = np.zeros(rows.size, dtype=np.int64)  # (A,) occurrences of each row's key
        counts[measured] = np.bincount(codes[measured])[codes[measured]]
        over = counts > self.cfg.max_count
        # One reason string per distinct count (few), spread to the rows by index.
        values, which = np.unique(counts[over], return_inverse=True)
        texts = np.array([f"too_frequent: caption occurs {n} times > max_count {self.cfg.max_count}"
                          for n in values], dtype=object)
        reasons[rows[over]] = texts[which]
        return reasons.tolist()
