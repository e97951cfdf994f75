"""What every source yields: candidate samples (or early rejections), plus the shared source config.

A source turns raw data (files, tables) into ``Sample`` objects with encoded image bytes and a
caption. It does not judge quality (that is the filters' job, so every verdict is recorded the same
way); it only reports items it cannot turn into a sample at all, as ``Rejected`` (e.g. no caption).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

from PIL import Image

from data_prep import PrepError
from data_prep.uid import make_uid

# Keys every sample's meta must carry: they go into the shard's json (the data contract).
REQUIRED_META = ("width", "height", "original_width", "original_height", "lang")
# What PIL raises for files it cannot read; the image_size filter records these as decode errors.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class SourceError(PrepError):
    """A source that cannot be read (missing root, malformed files); the message says how to fix it."""


@dataclass
class Sample:
    uid: str
    source: str
    source_id: str
    image: bytes  # encoded image file, written to the shard unchanged
    image_ext: str  # "png" | "jpg" | "webp": the shard member's extension
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)  # REQUIRED_META + source-specific extras


@dataclass
class Rejected:
    """An input item the source could not turn into a sample; recorded in decisions with ``reason``."""

    uid: str
    source: str
    source_id: str
    reason: str


@dataclass
class SourceConfig:
    """Options every source has; a source subclasses this to add its own and change defaults."""

    root: str = ""
    limit: Optional[int] = None  # at most this many input items (the first ones); None = all
    heldout_fraction: float = 0.0  # share of this source's kept samples that goes to the heldout split

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or null, got {self.limit}")
        if not 0.0 <= self.heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {self.heldout_fraction}")


class Source(abc.ABC):
    """An iterable of ``Sample | Rejected`` in a deterministic order, with ``len()`` for progress bars."""

    name: ClassVar[str]  # registry key and the ``source`` field of every sample
    Config: ClassVar[type[SourceConfig]]
    debian_package: ClassVar[str]  # where the default root comes from, named in the missing-root error

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root)
        if not self.root.exists():
            raise SourceError(
                f"sources.{self.name}.root: {self.root} does not exist; install it with "
                f"`apt-get install {self.debian_package}` or point sources.{self.name}.root at a copy"
            )

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Sample | Rejected]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def _limited(self, n: int) -> int:
        return n if self.cfg.limit is None else min(n, self.cfg.limit)

    def uid(self, source_id: str) -> str:
        return make_uid(self.name, source_id)
