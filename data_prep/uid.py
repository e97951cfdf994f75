"""Sample ids: 128-bit hex, a pure function of where a sample came from.

The same source item gets the same uid on every run and every machine, so re-runs, dedup and
decision records agree.
"""
from __future__ import annotations

import hashlib


def make_uid(source: str, source_id: str) -> str:
    """128-bit (32 hex chars) id of ``source_id`` inside ``source``."""
    return hashlib.blake2b(f"{source}\x00{source_id}".encode(), digest_size=16).hexdigest()
