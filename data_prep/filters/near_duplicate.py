"""Near duplicates: images whose 64-bit perceptual hash (pHash) is within ``max_distance`` bits of an
earlier kept image: re-encodes, resizes, light edits of the same picture.

Workers measure ``phash`` (16 hex chars, ``imagehash.phash`` of the image composited on white, so
clip art with transparent backgrounds hashes what it shows). The merge walks the alive rows in
build order: a row within ``max_distance`` of an earlier *kept* row is rejected, naming the nearest
such row; otherwise it is kept. Rows with the very same hash collapse onto their first occurrence.

Finding close pairs without comparing all pairs uses the pigeonhole principle: cut the 64 bits into
``max_distance + 1`` bands; two hashes within ``max_distance`` bits agree exactly on at least one
band, so only rows sharing a band value are compared. When a band value is shared by too many rows
(a huge dataset, or many look-alike images), that bucket is cut again the same way on its remaining
bits, which keeps candidate pairs near linear in the number of rows while missing no close pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from data_prep import images
from data_prep.filters.base import Filter, Measures
from data_prep.sources.base import Sample

HASH_INPUT = 32  # imagehash.phash's own input size (hash_size 8 x highfreq_factor 4)
BUCKET = 32  # rows sharing a band value above which the bucket is cut again (if that helps)
SAMPLE = 1 << 18  # rows sampled to judge whether cutting buckets again helps
CHUNK = 1 << 22  # candidate pairs made and checked at a time
_HEX = np.full(256, 255, dtype=np.uint8)  # ASCII code -> nibble value (255: not a hex digit)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = _HEX[np.frombuffer(b"0123456789ABCDEF", np.uint8)] = np.arange(16)


@dataclass
class NearDuplicateConfig:
    max_distance: int = 4  # Hamming bits between two pHashes; 0 = identical hashes only

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance <= 16:
            raise ValueError(f"max_distance: {self.max_distance} is out of range; allowed: 0 to 16 bits "
                             f"(beyond ~12 of 64, unrelated images start to match)")


class NearDuplicateFilter(Filter):
    name = "near_duplicate"
    Config = NearDuplicateConfig
    measure_types = {"phash": str}
    needs_image = True

    @property
    def is_global(self) -> bool:
        return True

    def measure(self, sample: Sample) -> Measures:
        # imagehash resizes to 32x32 with a plain Lanczos, which costs ~20 ms on a 1 MP photo; an
        # integer box reduction first (reducing_gap) makes it ~1 ms and the hash barely moves.
        # Resampling is linear, so shrinking before the gray conversion gives the same pixels, cheaper.
        im = images.on_white(images.decode(sample))
        small = im.resize((HASH_INPUT, HASH_INPUT), Image.Resampling.LANCZOS, reducing_gap=2.0).convert("L")
        return {"phash": str(imagehash.phash(small))}

    def global_reasons(self, table: pa.Table, alive: np.ndarray) -> list[str | None]:
        out: list[str | None] = [None] * len(table)
        if "phash" not in table.column_names:
            return out
        hashes, valid = hex64(table.column("phash"))
        rows = np.flatnonzero(np.asarray(alive, dtype=bool) & valid)  # (A,) in build order
        # One representative per distinct hash: its first alive row. Representatives in row order.
        distinct, first_pos, which = np.unique(hashes[rows], return_index=True, return_inverse=True)
        order = np.argsort(first_pos)
        rep_rows, rep_hash = rows[first_pos[order]], distinct[order]  # (R,)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        rep_of = rank[which.reshape(-1)]  # (A,) representative index of each alive row

        a, b, dist, n_candidates = close_pairs(rep_hash, self.cfg.max_distance)
        kept, target, tdist = first_kept(len(rep_hash), a, b, dist)
        # A row repeating a kept hash points at it (distance 0); a repeat of a rejected one, and the
        # representative itself, at the kept row that rejected the representative.
        repeat = rep_rows[rep_of] != rows
        to = np.where(repeat & kept[rep_of], rep_of, target[rep_of])  # (A,) -1: kept
        d = np.where(repeat & kept[rep_of], 0, tdist[rep_of])
        hit = to >= 0
        uids = table.column("uid").take(pa.array(rep_rows[to[hit]])).to_pylist()
        for row, uid, dd in zip(rows[hit].tolist(), uids, d[hit].tolist()):
            out[row] = f"near_duplicate: phash distance {dd} to {uid}"
        self.summary = {"candidate_pairs": int(n_candidates), "close_pairs": int(len(a)),
                        "rejected": int(hit.sum()), "distinct_hashes": int(len(rep_hash))}
        return out


def hex64(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid)``: 16-hex-digit strings as uint64 (0 where null), without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    filled = pc.fill_null(arr, "0" * 16).cast(pa.large_string())
    lengths = pc.binary_length(filled).to_numpy()
    if np.any(lengths != 16):
        bad = int(np.flatnonzero(lengths != 16)[0])
        raise ValueError(f"phash: row {bad} holds {filled[bad].as_py()!r}, not 16 hex digits")
    offsets = np.frombuffer(filled.buffers()[1], dtype=np.int64)[filled.offset:filled.offset + len(filled) + 1]
    raw = np.frombuffer(filled.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 16)
    nibbles = _HEX[raw]
    if np.any(nibbles == 255):
        bad = int(np.flatnonzero((nibbles == 255).any(axis=1))[0])
        raise ValueError(f"phash: row {bad} holds {filled[bad].as_py()!r}, not 16 hex digits")
    values = np.zeros(len(filled), dtype=np.uint64)
    for k in range(16):
        values = (values << np.uint64(4)) | nibbles[:, k].astype(np.uint64)
    return values, valid


def close_pairs(h: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(a, b, dist, candidates)``: every pair ``a < b`` of ``h`` (distinct uint64 hashes) within
    ``d`` bits, each once, with its distance; ``candidates`` counts the pairs compared."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    counter = [0]
    _collect(h, np.arange(len(h)), 0, list(range(64)), [], d, found, counter)
    return (_cat([f[0] for f in found]), _cat([f[1] for f in found]), _cat([f[2] for f in found]), counter[0])


def _collect(h: np.ndarray, idx: np.ndarray, fixed: int, free: list[int], exclude: list[int], d: int,
             found: list, counter: list[int]) -> None:
    """Close pairs among rows ``idx``, which agree on the bits of ``fixed`` and so differ in at most
    ``d`` of the ``free`` bit positions: one pass per band of ``free``. Rows of buckets bigger than
    ``BUCKET`` are cut again on the bits left (all such buckets in one vectorised call) when that
    at least halves their pairs; look-alikes that agree on most bits are compared directly.

    A pair is kept only where it is met first: not if it agrees on an earlier band (``exclude``, the
    earlier bands of this level and of the levels above), so each pair comes out exactly once."""
    done: list[int] = []
    for band in _bands(free, d + 1):
        mask = fixed | _mask(band)
        rest = [p for p in free if p not in set(band)]
        hs = h[idx]
        order, starts, sizes = _group(hs & np.uint64(mask))
        size_at = np.repeat(sizes, sizes)  # (N,) size of the bucket at each sorted position
        refine = np.zeros(len(order), dtype=bool)
        if len(rest) > d and np.any(sizes > BUCKET):
            refine = np.repeat(_worth_cutting(hs[order], starts, sizes, mask, rest, d), sizes)
        for first, second in _pairs_within(starts, sizes, (size_at >= 2) & ~refine):
            _check(h, idx[order[first]], idx[order[second]], d, exclude + done, found, counter)
        if refine.any():
            _collect(h, idx[order[refine]], mask, rest, exclude + done, d, found, counter)
        done.append(_mask(band))


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, sizes)``: positions sorted by key, and where each run of equal keys starts."""
    order = np.argsort(keys)  # not stable: the order within a bucket does not matter
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]]) if len(sk) else np.zeros(0, dtype=np.int64)
    return order, starts, np.diff(np.r_[starts, len(sk)])


def _pairs_within(starts: np.ndarray, sizes: np.ndarray, selected: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of sorted positions in the same bucket, among the ``selected`` positions (whole
    buckets), in chunks of about ``CHUNK`` pairs: vectorised over buckets, one step per distance k
    between the two positions (a chunk is checked before the next is made, so memory stays flat)."""
    pos = np.flatnonzero(selected)
    end = np.repeat(starts + sizes, sizes)[pos]  # one past the last position of the bucket
    firsts, seconds, held = [], [], 0
    k = 1
    while len(pos):
        inside = pos + k < end
        pos, end = pos[inside], end[inside]
        firsts.append(pos)
        seconds.append(pos + k)
        held += len(pos)
        k += 1
        if held >= CHUNK or not len(pos):
            yield _cat(firsts), _cat(seconds)
            firsts, seconds, held = [], [], 0


def _worth_cutting(hs: np.ndarray, starts: np.ndarray, sizes: np.ndarray, mask: int, rest: list[int],
                   d: int) -> np.ndarray:
    """Per bucket of the sorted hashes ``hs``: True when it is bigger than ``BUCKET`` and cutting it
    on ``rest`` would compare at most half of its pairs. Estimated on an evenly spaced sample of at
    most ``SAMPLE`` rows: a wrong guess costs time, never a missed pair."""
    big_at = np.flatnonzero(np.repeat(sizes > BUCKET, sizes))
    big_at = big_at[::max(1, len(big_at) // SAMPLE)]
    bucket = np.repeat(np.arange(len(sizes)), sizes)[big_at]
    sampled = np.bincount(bucket, minlength=len(sizes)).astype(np.float64)
    refined = np.zeros(len(sizes))
    for band in _bands(rest, d + 1):
        order, sub_starts, counts = _group(hs[big_at] & np.uint64(mask | _mask(band)))
        refined += np.bincount(bucket[order[sub_starts]], weights=counts * (counts - 1) / 2, minlength=len(sizes))
    return (sizes > BUCKET) & (refined * 2 <= sampled * (sampled - 1) / 2)


def _mask(bits: list[int]) -> int:
    return sum(1 << p for p in bits)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check(h: np.ndarray, i: np.ndarray, j: np.ndarray, d: int, exclude: list[int], found: list,
           counter: list[int]) -> None:
    """Keep the candidate pairs ``(i, j)`` within ``d`` bits that agree on none of ``exclude``."""
    counter[0] += len(i)
    x = h[i] ^ h[j]
    dist = np.bitwise_count(x)
    close = dist <= d
    for m in exclude:
        close &= (x & np.uint64(m)) != 0
    if close.any():
        i, j = i[close], j[close]
        found.append((np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64), dist[close].astype(np.int64)))


def _bands(bits: list[int], n: int) -> list[list[int]]:
    """``bits`` cut into ``n`` contiguous, nearly equal, non-empty bands (fewer if too few bits)."""
    n = min(n, len(bits))
    cuts = [round(k * len(bits) / n) for k in range(n + 1)]
    return [bits[cuts[k]:cuts[k + 1]] for k in range(n)]


def first_kept(n: int, a: np.ndarray, b: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy pass in index order over ``n`` items with close pairs ``a < b``: an item is rejected
    when some earlier close item was kept. Returns ``(kept, target, distance)``: for a rejected
    item, its nearest earlier kept close item (ties: the earliest) and their distance; -1 if kept.

    Resolved in vectorised rounds instead of a Python loop: an item whose earlier neighbours are
    all decided is decided in the next round, so rounds = length of the longest dependency chain."""
    state = np.ones(n, dtype=np.int8)  # 1 kept, 2 rejected, 0 undecided: items with an earlier neighbour
    state[b] = 0
    blocked = np.zeros(n, dtype=bool)  # scratch, reset after each round: rounds cost O(edges), not O(n)
    ea, eb = a, b  # the edges into still undecided items
    while len(eb):
        state[eb[state[ea] == 1]] = 2
        live = eb[state[ea] != 2]  # an undecided (or kept) earlier neighbour: not free yet
        blocked[live] = True
        free = eb[~blocked[eb]]
        state[free[state[free] == 0]] = 1  # every earlier neighbour was rejected
        blocked[live] = False
        undecided = state[eb] == 0
        ea, eb = ea[undecided], eb[undecided]
    target = np.full(n, -1, dtype=np.int64)
    tdist = np.full(n, -1, dtype=np.int64)
    by_kept = (state[a] == 1) & (state[b] == 2)
    ka, kb, kd = a[by_kept], b[by_kept], dist[by_kept]
    order = np.lexsort((ka, kd, kb))  # per rejected item: nearest, then earliest
    ka, kb, kd = ka[order], kb[order], kd[order]
    first = np.r_[True, kb[1:] != kb[:-1]] if len(kb) else np.zeros(0, dtype=bool)
    target[kb[first]], tdist[kb[first]] = ka[first], kd[first]
    return state == 1, target, tdist
