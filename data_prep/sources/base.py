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
# TypeError: PIL's TIFF loader raises it for hostile tags ("'IFDRational' object cannot be
# interpreted as an integer", found by tests/chaos/test_chaos_fuzz_prep.py).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError)


def text_id(name: str) -> str:
    """``name`` as valid UTF-8 text, for ids and reasons: Python decodes undecodable bytes of file and
    member names to lone surrogates, which parquet and UTF-8 json cannot hold; they become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_text(value: str) -> bool:
    """True when ``value`` holds no lone surrogates (undecodable input bytes), so it can be stored as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SourceError(PrepError):
    """A source that cannot be read (missing root, malformed files); the message says how to fix it."""


@dataclass
class Sample:
    uid: str
    source: str
    source_id: str
    image: bytes | None  # encoded image file; None until fetched from ``url``
    image_ext: str  # "png" | "jpg" | "webp": the shard member's extension ("" until fetched)
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)  # REQUIRED_META + source-specific extras
    url: str | None = None  # where ``image`` comes from when the source does not read it itself
    # Decoded pixels, cached by ``data_prep.images.decode`` so several image stages decode once.
    decoded: Any = field(default=None, repr=False, compare=False)


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

    type: Optional[str] = None  # the registered source type; None = the config entry's name
    root: str = ""
    limit: Optional[int] = None  # at most this many input items (the first ones); None = all
    heldout_fraction: float = 0.0  # share of this source's kept samples that goes to the heldout split

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or null, got {self.limit}")
        if not 0.0 <= self.heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {self.heldout_fraction}")


class Source(abc.ABC):
    """Raw data split into *units*: the pieces of work the builder hands to its workers.

    ``plan`` lists the units once (deterministically; it may write chunk files under ``work_dir``,
    e.g. a streaming table reader cutting a 100M-row table into row chunks); ``read`` yields one
    unit's items, ``Sample | Rejected``, in a deterministic order. Any process, on any machine
    sharing ``work_dir``, can ``read`` any unit of the plan, which is what makes the work
    splittable and a killed build resumable unit by unit."""

    name: ClassVar[str]  # registry key and the default ``source`` field of every sample
    Config: ClassVar[type[SourceConfig]]
    debian_package: ClassVar[str] = ""  # where the default root comes from, named in the missing-root error

    def __init__(self, cfg: SourceConfig, name: str | None = None) -> None:
        self.cfg = cfg
        self.label = name or self.name  # the config entry's key: several entries may share a type
        self.root = Path(cfg.root)
        if not self.root.exists():
            how = (f"install it with `apt-get install {self.debian_package}` or point "
                   if self.debian_package else "point ")
            raise SourceError(f"sources.{self.label}.root: {self.root} does not exist; {how}"
                              f"sources.{self.label}.root at a copy")

    def plan(self, work_dir: Path, unit_size: int) -> list[str]:
        """Unit ids of this source, in order. Default: ``"start-stop"`` ranges of ``len(self)`` items."""
        n = len(self)
        return [f"{a}-{min(a + unit_size, n)}" for a in range(0, n, unit_size)]

    def read(self, unit: str, work_dir: Path) -> Iterator[Sample | Rejected]:
        """The items of one unit. Default: items ``start..stop`` of ``iter_range``."""
        a, b = (int(x) for x in unit.split("-"))
        return self.iter_range(a, b)

    def iter_range(self, start: int, stop: int) -> Iterator[Sample | Rejected]:
        raise NotImplementedError(f"source {self.name} must implement iter_range or read")

    def __len__(self) -> int:
        raise NotImplementedError(f"source {self.name} must implement __len__ or plan")

    def __iter__(self) -> Iterator[Sample | Rejected]:
        """Every item of a range-based source, in order (tools and tests)."""
        return self.iter_range(0, len(self))

    def items(self, work_dir: Path, unit_size: int = 10_000) -> Iterator[Sample | Rejected]:
        """Every item, unit by unit (for tools and tests; the builder reads units itself)."""
        for unit in self.plan(work_dir, unit_size):
            yield from self.read(unit, work_dir)

    def _limited(self, n: int) -> int:
        return n if self.cfg.limit is None else min(n, self.cfg.limit)

    def uid(self, source_id: str) -> str:
        return make_uid(self.label, source_id)
