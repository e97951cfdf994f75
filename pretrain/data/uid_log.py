"""Which samples trained the model: a per-rank log of the uids each optimizer step consumed.

``<run_dir>/uids/rank_XXXXX.jsonl`` (``data.log_uids=true``), one line per step:
``{"step": 7, "uids": [...]}``, plus ``"skipped": true`` for a step whose update was dropped
(a non-finite loss, see ``pretrain.nonfinite``). A resumed run re-trains the steps after its
checkpoint, so on start the log is cut back to the checkpoint's step (an atomic rewrite): the
lines it keeps are exactly the steps whose gradient the resumed model carries, and after a run
that crashed and resumed any number of times each sample of an epoch appears once across ranks.

Lines are flushed every step (a killed process loses nothing it logged; a torn last line, from a
crash of the machine itself, is dropped on the next start with everything after the checkpoint).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Optional

from data_prep.atomic import atomic_write

UID_DIR = "uids"


def uid_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / UID_DIR / f"rank_{rank:05d}.jsonl"


def read_uid_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The log's rows in file order; a torn (unparsable) line is left out."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class UidLog:
    """One rank's log; every method does nothing when the log is off."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, enabled: bool) -> None:
        self.path = uid_log_path(run_dir, rank)
        self.enabled = enabled
        self._file: Optional[IO[str]] = None

    def open(self, resumed_step: int) -> None:
        """Keep the rows of steps <= ``resumed_step`` (0: a fresh run keeps none), then append."""
        if not self.enabled:
            return
        kept = [row for row in read_uid_log(self.path) if row["step"] <= resumed_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        self._file = open(self.path, "a")

    def write(self, step: int, uids: list[str], skipped: bool = False) -> None:
        if self._file is None:
            return
        row: dict[str, Any] = {"step": step, "uids": uids}
        if skipped:
            row["skipped"] = True
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # into the OS: survives a SIGKILL of this process

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
