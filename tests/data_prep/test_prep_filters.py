"""Filters on real Tux Paint bytes: what they reject, with which reason, and that nothing raises."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.build import decide
from data_prep.config import ConfigError, load_config
from data_prep.filters import FILTERS, Filter, apply_filters, make_filter
from data_prep.filters.caption_length import CaptionLengthConfig
from data_prep.filters.image_size import ImageSizeConfig
from data_prep.sources import Sample
from data_prep.uid import make_uid

STAMPS = Path("/usr/share/tuxpaint/stamps")
GOOD_PNG = STAMPS / "animals/birds/nandou.png"  # 200x151


def sample(png: Path = GOOD_PNG, caption: str = "A rhea.", image: bytes | None = None) -> Sample:
    return Sample(uid=make_uid("test", str(png)), source="test", source_id=str(png),
                  image=png.read_bytes() if image is None else image, image_ext="png", caption=caption,
                  meta={"width": 1, "height": 1, "original_width": 1, "original_height": 1, "lang": "en"})


@pytest.fixture
def filters() -> list[Filter]:
    return [make_filter("image_size", ImageSizeConfig()), make_filter("caption_length", CaptionLengthConfig())]


def test_good_sample_is_kept_with_measures(filters):
    v = apply_filters(filters, sample())
    assert v.kept and v.measures == {"width": 200, "height": 151, "aspect_ratio": pytest.approx(200 / 151),
                                     "caption_words": 2, "caption_chars": 7}


@pytest.mark.parametrize("png, reason", [
    ("seasonal/newyears/party-horn-out.png", "too_small: shorter side 7 px < min_side 16"),  # 39x7
    ("symbols/music/rest_025.png", "too_small: shorter side 12 px < min_side 16"),  # 12x36
    ("household/tools/spade.png", "bad_aspect: 3.38 > max_aspect 3.0"),  # 694x2348
])
def test_image_size_rejects_tiny_and_elongated_stamps(filters, png, reason):
    v = apply_filters(filters, sample(STAMPS / png))
    assert (v.filter, v.reason) == ("image_size", reason)


def test_corrupt_image_is_recorded_not_raised(filters):
    truncated = GOOD_PNG.read_bytes()[:400]
    d = decide(sample(image=truncated), filters, heldout_fraction=0.0, seed=0)
    assert not d.kept and d.filter == "image_size" and d.reason.startswith("decode_error: ")
    d = decide(sample(image=b"not an image"), filters, heldout_fraction=0.0, seed=0)
    assert d.reason.startswith("decode_error: UnidentifiedImageError")


@pytest.mark.parametrize("caption, reason", [
    ("", "empty_caption"),
    (" \t\n ", "empty_caption"),
    (b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape"), "caption_not_utf8"),  # latin-1 bytes
    ("word " * 65, "too_many_words: 65 > max_words 64"),
    ("a" * 301, "too_long: 301 chars > max_chars 300"),
])
def test_caption_length_rejects(filters, caption, reason):
    v = apply_filters(filters, sample(caption=caption))
    assert v.filter == "caption_length" and v.reason.startswith(reason)


def test_first_rejection_wins_in_configured_order():
    bad = sample(STAMPS / "seasonal/newyears/party-horn-out.png", caption="")
    cfg = load_config(["~filters.image_size", "+filters.image_size={min_side: 16}"])  # now runs second
    assert list(cfg.filters) == ["caption_length", "image_size"]
    v = apply_filters([make_filter(n, c) for n, c in cfg.filters.items()], bad)
    assert v.filter == "caption_length" and "width" not in v.measures  # image_size never ran


def test_new_filter_is_one_class_and_one_registry_entry(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class NoDigitsConfig:
        max_digits: int = 0

    class NoDigits(Filter):
        name, Config, measure_types = "no_digits", NoDigitsConfig, {"digits": int}

        def measure(self, s):
            return {"digits": sum(c.isdigit() for c in s.caption)}

        def reject_reason(self, m):
            return f"digits: {m['digits']}" if m["digits"] > self.cfg.max_digits else None

    monkeypatch.setitem(FILTERS, "no_digits", NoDigits)
    cfg = load_config(["+filters.no_digits={max_digits: 1}"])
    v = apply_filters([make_filter(n, c) for n, c in cfg.filters.items()], sample(caption="route 66"))
    assert (v.filter, v.reason) == ("no_digits", "digits: 2")
    with pytest.raises(ConfigError, match=r"filters.no_digits.max_digitz: unknown option; allowed: max_digits"):
        load_config(["+filters.no_digits={max_digitz: 1}"])


def test_sample_without_contract_meta_never_reaches_a_shard():
    s = sample(image=b"broken")
    s.meta["width"] = None  # what a source records when it cannot read the image
    d = decide(s, [make_filter("caption_length", CaptionLengthConfig())], heldout_fraction=0.0, seed=0)
    assert (d.kept, d.filter, d.reason) == (False, "source", "missing_meta: width")
