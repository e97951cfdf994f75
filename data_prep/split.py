"""Train/heldout assignment: a hash of the uid, so it is stable across runs and machines."""
from __future__ import annotations

import hashlib

SPLITS = ("train", "heldout")


def assign_split(uid: str, heldout_fraction: float, seed: int) -> str:
    """``heldout`` for a ``heldout_fraction`` share of uids, decided by a hash: stable across runs,
    independent of which other samples exist, and reshuffled only by changing ``seed``."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")
    return "heldout" if h < heldout_fraction * 2**64 else "train"
