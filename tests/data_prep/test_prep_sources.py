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

STAMPS = Path("/usr/share/tuxpaint/stamps")


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


def test_tuxpaint_caption_and_fallback():
    assert read_caption(STAMPS / "symbols/money/us/coins/025quarter.txt") == "A US 25 cent piece ($.25) called a quarter."
    assert caption_file(STAMPS / "vehicles/ship/cartoon/tugboat_mirror.png") == STAMPS / "vehicles/ship/cartoon/tugboat.txt"
    assert caption_file(STAMPS / "seasonal/hanukkah/dreydl-nun_mirror.png").name == "dreydl-nun.txt"
    assert caption_file(STAMPS / "cartoon/tux/tux-drat.png") is None


def test_tuxpaint_source_items():
    items = list(TuxPaint(TuxPaintConfig(limit=160)))
    assert len(items) == 160
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert {r.source_id for r in rejected} == {f"cartoon/tux/tux-{n}.png" for n in
                                             ("drat", "kiss1", "kiss2", "yay2", "yes1", "yes2")}
    assert all(r.reason == "no_caption" for r in rejected)
    s = next(i for i in items if i.source_id == "animals/birds/nandou.png")
    assert s.caption == "A rhea." and s.image == (STAMPS / s.source_id).read_bytes()  # small: bytes unchanged
    assert s.meta == {"width": 200, "height": 151, "original_width": 200, "original_height": 151,
                      "lang": "en", "category": "animals"}


def test_large_stamp_is_downscaled_keeping_alpha():
    data = (STAMPS / "household/tools/spade.png").read_bytes()
    out, size, original = shrink_png(data, 256)
    assert original == (694, 2348) and size == (76, 256)
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == size and im.mode in ("RGBA", "LA") and im.getextrema()[-1][0] < 255  # transparent pixels


def test_missing_root_names_the_package(tmp_path):
    with pytest.raises(SourceError, match=r"apt-get install tuxpaint-stamps-default"):
        TuxPaint(TuxPaintConfig(root=str(tmp_path / "missing")))
