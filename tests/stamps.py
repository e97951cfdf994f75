"""The Tux Paint stamps the tests use, found by what they are, never by where one release put them.

Machines of this kind run Debian 12 or 13, and their ``tuxpaint-stamps-default`` packages differ:
folders, counts, which stamps have a caption. So no test names a stamp's path or counts the
package. Tests ask this module for stamps by property ("captioned", "with transparent pixels",
"taller than 400 px"), derived from the files on disk, and *make* what they need of a given
geometry (an elongated image, a tiny one, exact sizes, a mirror, a damaged file) from real stamp
pixels. :func:`make_stamp_tree` builds the small dataset's stamp folder the same way, with the
rejections the build tests check planted in it.

``CLIPFORGE_TEST_STAMPS`` points the whole suite at another copy of the tree:
``tests/data_prep/test_stamp_layout.py`` runs the stamp tests on a rearranged copy with captions
hidden, to show that they cannot tell.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

ROOT = Path(os.environ.get("CLIPFORGE_TEST_STAMPS", "/usr/share/tuxpaint/stamps"))


@dataclass(frozen=True)
class Stamp:
    """One PNG stamp on disk and what its header and own caption file say."""

    path: Path
    width: int
    height: int
    mode: str
    caption: Optional[str]  # line 1 of its own NAME.txt, stripped; None without one (or not UTF-8)

    @property
    def rel(self) -> str:
        """Path relative to :data:`ROOT`, as the tuxpaint source's ``source_id``."""
        return self.path.relative_to(ROOT).as_posix()

    @property
    def aspect(self) -> float:
        return max(self.width, self.height) / min(self.width, self.height)

    @property
    def txt(self) -> Path:
        return self.path.with_suffix(".txt")

    def image(self) -> Image.Image:
        """The decoded pixels as RGBA."""
        with Image.open(self.path) as im:
            return im.convert("RGBA")

    def has_transparency(self) -> bool:
        """Whether some pixel is fully transparent (a clip-art background)."""
        return self.image().getextrema()[3][0] == 0


def _own_caption(png: Path) -> Optional[str]:
    txt = png.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        lines = txt.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return None
    return lines[0].strip() if lines and lines[0].strip() else None


@functools.lru_cache(maxsize=None)
def all_stamps() -> tuple[Stamp, ...]:
    """Every PNG under :data:`ROOT`, in the tuxpaint source's order (relative path); headers only."""
    if not ROOT.is_dir():
        raise FileNotFoundError(f"{ROOT} is missing: apt-get install tuxpaint-stamps-default "
                                "(or point CLIPFORGE_TEST_STAMPS at a copy of the stamps)")
    out = []
    for png in sorted(ROOT.rglob("*.png"), key=lambda p: p.relative_to(ROOT).as_posix()):
        with Image.open(png) as im:
            out.append(Stamp(png, im.width, im.height, im.mode, _own_caption(png)))
    return tuple(out)


def is_plain(s: Stamp) -> bool:
    """A stamp every default stage keeps, by a wide margin: its own short English caption, neither
    tiny nor elongated. Checked with PIL and str.split, not with the code under test."""
    return (s.caption is not None and s.caption.isascii() and 1 <= len(s.caption.split()) <= 40
            and len(s.caption) <= 200 and min(s.width, s.height) >= 24 and s.aspect <= 2.5)


def find(what: str, where: Callable[[Stamp], bool]) -> Stamp:
    """The first stamp (in source order) for which ``where`` holds; ``what`` names it in the error."""
    for s in all_stamps():
        if where(s):
            return s
    raise LookupError(f"no stamp under {ROOT} is {what}")


def plain(n: int, start: int = 0) -> list[Stamp]:
    """The first ``n`` plain stamps (see :func:`is_plain`) from position ``start`` of the source order."""
    out = [s for s in all_stamps()[start:] if is_plain(s)][:n]
    if len(out) < n:
        raise LookupError(f"only {len(out)} plain stamps under {ROOT} from position {start}, {n} wanted")
    return out


def categories() -> list[str]:
    """The top-level folders that hold stamps, sorted."""
    return sorted({Path(s.rel).parts[0] for s in all_stamps() if "/" in s.rel})


def png_bytes(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def transparent_stamp() -> Stamp:
    """A plain stamp with a transparent background, the source of made images."""
    return find("plain with transparent pixels", lambda s: is_plain(s) and s.mode == "RGBA" and s.has_transparency())


def made_image(size: tuple[int, int], mode: str = "RGBA", base: Optional[Stamp] = None) -> Image.Image:
    """Real stamp pixels (``base``, default :func:`transparent_stamp`) resized to exactly ``size``."""
    im = (base or transparent_stamp()).image().resize(size, Image.Resampling.LANCZOS)
    return im if mode == "RGBA" else im.convert(mode)


def made_png(size: tuple[int, int], mode: str = "RGBA", base: Optional[Stamp] = None) -> bytes:
    """:func:`made_image` as PNG bytes."""
    return png_bytes(made_image(size, mode, base))


# ---- the small build's stamp folder -------------------------------------------------------------

MADE = "made"  # sub-folder of the planted stamps
NO_CAPTION = [f"{MADE}/uncaptioned-{c}.png" for c in "abcd"]  # no NAME.txt, no base stamp's either
ELONGATED = f"{MADE}/elongated.png"  # 160 x 40: aspect 4 > the default max_aspect 3
ELONGATED_SIZE = (160, 40)
TINY = f"{MADE}/tiny.png"  # 40 x 8: shorter side < the default min_side 16
CORRUPT = f"{MADE}/corrupt.png"  # a PNG cut short: a decode error
IMAGE_SIZE_REJECTS = {ELONGATED: "bad_aspect", TINY: "too_small", CORRUPT: "decode_error"}


@dataclass(frozen=True)
class StampTree:
    root: Path
    plain: list[str]  # relative paths of the copied real stamps, all kept by the default stages
    inputs: int  # every PNG in the tree


def make_stamp_tree(dest: Path, n_plain: int, start: int = 0) -> StampTree:
    """A Tux Paint-shaped folder: ``n_plain`` real plain stamps (with their caption files) from
    position ``start`` of the source order, plus planted inputs the default build must reject:
    :data:`NO_CAPTION` (source), :data:`ELONGATED`, :data:`TINY` and :data:`CORRUPT` (image_size)."""
    chosen = plain(n_plain, start)
    for s in chosen:
        target = dest / s.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, target)
        shutil.copyfile(s.txt, target.with_suffix(".txt"))  # the caption and its translations
    made = dest / MADE
    made.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(NO_CAPTION):
        (dest / rel).write_bytes(made_png((64 + 8 * i, 64)))
    for rel, caption, data in [
        (ELONGATED, "A stamp stretched four times wider than tall.", made_png(ELONGATED_SIZE)),
        (TINY, "A stamp shrunk to a sliver.", made_png((40, 8))),
        (CORRUPT, "A stamp whose file was cut short.", made_png((96, 96))[:300]),
    ]:
        (dest / rel).write_bytes(data)
        (dest / rel).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return StampTree(dest, [s.rel for s in chosen], len(chosen) + len(NO_CAPTION) + len(IMAGE_SIZE_REJECTS))
