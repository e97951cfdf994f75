"""Sources on the real Debian data: Fashion-MNIST IDX reading, Tux Paint captions and resizing."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.sources import Rejected, SourceError
from data_prep.sources.fashion_mnist import CLASSNAMES, TEMPLATES, FashionMnist, FashionMnistConfig, load_split
from data_prep.sources.tuxpaint import TuxPaint, TuxPaintConfig, caption_file, read_caption, shrink_png
from tests import stamps



def test_load_split_reads_both_splits():
    root = FashionMnistConfig().root
    for split, n in (("train", 60000), ("t10k", 10000), ("test", 10000)):
        images, labels = load_split(root, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert len(CLASSNAMES) == 10 and all("{}" in t for t in TEMPLATES) and len(TEMPLATES) >= 8
    with pytest.raises(ValueError, match="allowed"):
        load_split(root, "validation")


def test_fashion_mnist_samples():
    src = FashionMnist(FashionMnistConfig(limit=20))
    samples = list(src)
    assert len(src) == len(samples) == 20
    images, labels = load_split(src.root, "train")
    for i, s in enumerate(samples):
        assert s.source_id == f"train/{i}" and s.meta["label"] == labels[i]
        assert s.caption in {t.format(CLASSNAMES[labels[i]]) for t in TEMPLATES}
        with Image.open(io.BytesIO(s.image)) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), images[i])
    assert len({s.caption for s in samples}) > 5  # templates vary with the uid
    assert [s.uid for s in FashionMnist(FashionMnistConfig(limit=20))] == [s.uid for s in samples]


def write_stamp(root: Path, rel: str, caption: str | None = None, size: tuple[int, int] = (64, 48)) -> Path:
    """A stamp made of real pixels at ``root/rel``, with ``caption`` on line 1 of its txt (None: no txt)."""
    png = root / rel
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(stamps.made_png(size))
    if caption is not None:
        png.with_suffix(".txt").write_text(f"{caption}\nde.utf8={caption} (de)\n", encoding="utf-8")
    return png


def test_tuxpaint_caption_and_fallback(tmp_path):
    root = tmp_path / "stamps"
    base = write_stamp(root, "vehicles/tug.png", "A tugboat.")
    for variant in ("tug_mirror", "tug-1", "tug2", "tug_3_mirror"):  # Tux Paint's variant suffixes
        assert caption_file(write_stamp(root, f"vehicles/{variant}.png")) == base.with_suffix(".txt"), variant
    own = write_stamp(root, "vehicles/tug-2.png", "A tugboat, seen from the side.")
    assert caption_file(own) == own.with_suffix(".txt")  # its own text wins over the base's
    for orphan in ("vehicles/barge.png", "other/tug_mirror.png", "vehicles/2.png"):  # no base in its folder
        assert caption_file(write_stamp(root, orphan)) is None, orphan
    # Line 1, stripped; a byte-order mark and the translations below are not part of it.
    bom = root / "bom.txt"
    bom.write_bytes("\ufeff  A quarter ($.25).  \r\nfr.utf8=Une pièce\n".encode("utf-8"))
    assert read_caption(bom) == "A quarter ($.25)."
    real = stamps.find("plain", stamps.is_plain)
    assert read_caption(real.txt) == real.caption


def test_tuxpaint_source_items(tmp_path):
    """A copy of real stamps with some captions hidden: exactly those are rejected, in path order."""
    root = tmp_path / "stamps"
    real = stamps.plain(12)
    hidden = {s.rel for s in real[1::4]}
    for s in real:
        (root / s.rel).parent.mkdir(parents=True, exist_ok=True)
        (root / s.rel).write_bytes(s.path.read_bytes())
        if s.rel not in hidden:
            (root / s.rel).with_suffix(".txt").write_bytes(s.txt.read_bytes())
    items = list(TuxPaint(TuxPaintConfig(root=str(root), limit=10)))
    assert [i.source_id for i in items] == sorted(s.rel for s in real)[:10]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert {r.source_id for r in rejected} == hidden & {i.source_id for i in items} and rejected
    assert all(r.reason == "no_caption" for r in rejected)
    small = next(s for s in real if s.rel not in hidden and max(s.width, s.height) <= 256)
    item = next(i for i in items if i.source_id == small.rel)
    assert item.caption == small.caption and item.image == small.path.read_bytes()  # small: bytes unchanged
    assert item.meta == {"width": small.width, "height": small.height, "original_width": small.width,
                         "original_height": small.height, "lang": "en", "category": small.rel.split("/")[0]}


def test_large_stamp_is_downscaled_keeping_alpha():
    data = stamps.made_png((694, 2348))
    out, size, original = shrink_png(data, 256)
    assert original == (694, 2348) and size == (76, 256)
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == size and im.mode in ("RGBA", "LA") and im.getextrema()[-1][0] < 255  # transparent pixels


def test_real_palette_and_grey_stamps_shrink_too():
    """Every colour mode the package ships (palette, grey+alpha, RGBA) survives downscaling."""
    for mode in sorted({s.mode for s in stamps.all_stamps()}):
        s = stamps.find(f"a {mode} stamp", lambda s, mode=mode: s.mode == mode)
        out, size, original = shrink_png(s.path.read_bytes(), 32)
        assert original == (s.width, s.height) and max(size) == min(32, max(original))
        with Image.open(io.BytesIO(out)) as im:
            assert im.size == size


def test_missing_root_names_the_package(tmp_path):
    with pytest.raises(SourceError, match=r"apt-get install tuxpaint-stamps-default"):
        TuxPaint(TuxPaintConfig(root=str(tmp_path / "missing")))
