"""A folder of images with sidecar captions: ``a/b/cat.jpg`` + ``a/b/cat.txt``.

Images are found recursively (jpg/jpeg/png/webp/bmp/gif, any letter case) and ordered by relative
path, so units and ``limit`` are the same on every machine. The source does not read the images:
each sample's ``url`` is the file's absolute path and the worker reads it only if the text stages
keep the sample.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_prep.sources.base import REQUIRED_META, Rejected, Sample, Source, SourceConfig, is_text, text_id

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})
MAX_CAPTION_BYTES = 1 << 20  # a larger sidecar is no caption (and must not be read into memory)


@dataclass
class FolderConfig(SourceConfig):
    caption_ext: str = "txt"  # the caption of ``NAME.jpg`` is ``NAME.<caption_ext>`` beside it
    caption_first_line: bool = False  # True: only the first non-empty line (files with extra lines below)

    def __post_init__(self) -> None:
        super().__post_init__()
        ext = self.caption_ext
        if not ext or "/" in ext or ext.startswith(".") or ext.lower() in IMAGE_EXTS:
            raise ValueError(f"caption_ext: {ext!r} must be a file extension without the dot "
                             f"(like 'txt' or 'caption') and not an image extension")


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under ``root``, sorted; symlinked folders are not followed."""
    found = []
    for folder, _, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.rpartition(".")[2].lower() in IMAGE_EXTS and "." in f]
    return sorted(found)


def read_sidecar(path: Path, first_line: bool = False) -> str:
    """The caption text, stripped (or its first non-empty line). Bytes that are not UTF-8 survive as
    surrogates so the caption stage rejects them by name instead of this reader crashing. Raises
    ``ValueError`` for a sidecar that is not a regular file (a FIFO would block the read for ever,
    /dev/zero never end) or is over ``MAX_CAPTION_BYTES``."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):  # a folder: IsADirectoryError below
        raise ValueError(f"{path.name} is not a regular file")
    if st.st_size > MAX_CAPTION_BYTES:
        raise ValueError(f"{path.name} has {st.st_size} bytes > {MAX_CAPTION_BYTES}")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if first_line:
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    return text.strip()


class Folder(Source):
    name = "folder"
    Config = FolderConfig

    def __init__(self, cfg: FolderConfig, name: str | None = None) -> None:
        super().__init__(cfg, name)
        self.root = Path(os.path.abspath(self.root))  # sample urls are absolute paths
        images = list_images(self.root)  # relative str paths: far smaller than Path objects for big folders
        self.images = images[: self._limited(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def iter_range(self, start: int, stop: int) -> Iterator[Sample | Rejected]:
        for rel in self.images[start:stop]:
            if not is_text(rel) or not is_text(str(self.root)):  # ids and urls are stored as UTF-8 text
                yield Rejected(uid=self.uid(text_id(rel)), source=self.label, source_id=text_id(rel),
                               reason=f"bad_name: {text_id(rel)!r} is not UTF-8; rename the file")
                continue
            uid = self.uid(rel)
            path = self.root / rel
            sidecar = path.with_name(f"{path.stem}.{self.cfg.caption_ext}")
            try:
                caption = read_sidecar(sidecar, self.cfg.caption_first_line)
            except (FileNotFoundError, IsADirectoryError):
                yield Rejected(uid=uid, source=self.label, source_id=rel, reason="no_caption")
                continue
            except (OSError, ValueError) as e:  # unreadable (permissions), not a file, too large
                yield Rejected(uid=uid, source=self.label, source_id=rel, reason=f"bad_caption_file: {e}")
                continue
            yield Sample(uid=uid, source=self.label, source_id=rel, image=None, image_ext="", caption=caption,
                         meta=dict.fromkeys(REQUIRED_META), url=str(path))
