"""Building blocks for hostile tar inputs, shared by the reader and whole-build tests."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path


class Trap:
    """Unpickling this creates ``path``: proof that someone ran pickle.loads on the payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def add_member(tf: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    """Add ``name`` with ``data`` to ``tf``; ``info`` sets TarInfo fields (e.g. type=tarfile.SYMTYPE)."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
