"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every file the builder publishes (shards, manifest, decisions) is written to a temporary name in the
same folder and renamed into place; rename within one filesystem is atomic on POSIX.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from data_prep import PrepError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes owner-only files; published files follow the umask
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class UnwritableDirError(PrepError):
    """An output folder cannot be created or written; the message names the setting and the path."""


def ensure_writable_dir(path: str | os.PathLike, setting: str) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it, before any work starts.

    The probe writes and fsyncs one 4 KiB block, so a read-only mount, missing permissions, a file
    in the way and a full disk all fail here in one line instead of hours later, mid-write."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
        raise UnwritableDirError(f"{setting}={path}: cannot write there ({why}); "
                                 f"set {setting} to a folder you can write to") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
