"""Exact duplicates: the same (url, caption) pair, or the same image bytes, met earlier in the build.

Both are global stages: workers only hash (``pair_key``, ``image_key``); the merge keeps, among the
samples still alive, the first occurrence of each key in build order and rejects the later ones,
naming the kept one. The verdict is one hash-table pass (pyarrow's ``dictionary_encode``) and one
integer sort, so tens of millions of rows take seconds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.filters.base import Filter, Measures, Reject
from data_prep.sources.base import Sample


@dataclass
class DuplicateConfig:
    """No options: a later copy of something kept is always dropped (order decides which one stays)."""


def first_occurrence(keys: pa.ChunkedArray | pa.Array, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, firsts)``: the alive rows whose key (not null) already occurred at an earlier alive
    row, and that earliest row for each of them. Both int64, ``rows`` ascending."""
    if isinstance(keys, pa.ChunkedArray):  # one dictionary for all rows, not one per chunk
        keys = keys.combine_chunks()
    codes = pc.fill_null(pc.dictionary_encode(keys).indices, -1).to_numpy().astype(np.int64)
    cand = np.flatnonzero(np.asarray(alive, dtype=bool) & (codes >= 0))  # (A,) ascending
    # A stable unique gives each key's first alive row; every other row of that key is a repeat.
    _, first_pos, inverse = np.unique(codes[cand], return_index=True, return_inverse=True)
    firsts = cand[first_pos][inverse.reshape(-1)]  # (A,) the first alive row of each row's key
    repeat = firsts != cand
    return cand[repeat], firsts[repeat]


def reasons_for(table: pa.Table, rows: np.ndarray, firsts: np.ndarray, template: str) -> list[str | None]:
    """One verdict per row of ``table``: ``template`` (with ``{uid}`` = the kept row's uid) at ``rows``."""
    out: list[str | None] = [None] * len(table)
    if len(rows):
        kept_uids = table.column("uid").take(pa.array(firsts)).to_pylist()
        for row, uid in zip(rows.tolist(), kept_uids):
            out[row] = template.format(uid=uid)
    return out


class _FirstOccurrence(Filter):
    """A global stage that keeps the first alive occurrence of its one measure (the key)."""

    Config = DuplicateConfig
    key: str  # the measure holding the key
    template: str  # reason of a later occurrence; ``{uid}`` names the kept one

    @property
    def is_global(self) -> bool:
        return True

    def global_reasons(self, table: pa.Table, alive: np.ndarray) -> list[str | None]:
        rows, firsts = first_occurrence(table.column(self.key), alive)
        self.summary = {"duplicates": int(len(rows)), "distinct_kept": int(len(np.unique(firsts)))}
        return reasons_for(table, rows, firsts, self.template)


class DuplicatePairFilter(_FirstOccurrence):
    """The same caption for the same image address: a table listing a row twice, or two sources
    carrying the same item. Needs no image, so it can run before any download."""

    name = "duplicate_pair"
    measure_types = {"pair_key": str}
    key = "pair_key"
    template = "duplicate_pair: same url and caption as {uid}"

    def measure(self, sample: Sample) -> Measures:
        where = sample.url or f"{sample.source}:{sample.source_id}"
        # NUL between the parts so ("ab", "c") and ("a", "bc") differ; 64 bits: a false match among
        # 100M rows has a probability below 1e-3 and would only drop one sample.
        digest = hashlib.blake2b(f"{where}\0{sample.caption}".encode("utf-8", "surrogatepass"), digest_size=8)
        return {"pair_key": digest.hexdigest()}


class DuplicateImageFilter(_FirstOccurrence):
    """Byte-identical images (mirrors, re-uploads, the same file under two captions)."""

    name = "duplicate_image"
    measure_types = {"image_key": str}
    needs_image = True
    key = "image_key"
    template = "duplicate_image: same bytes as {uid}"

    def measure(self, sample: Sample) -> Measures:
        if sample.image is None:
            raise Reject("no_image: the image was not fetched")
        return {"image_key": hashlib.blake2b(sample.image, digest_size=16).hexdigest()}
