"""Filters on real Tux Paint bytes: what they reject, with which reason, and that nothing raises."""
from __future__ import annotations

import zlib

import pytest

from data_prep.config import ConfigError, load_config
from data_prep.filters import FILTERS, Filter, apply_filters, make_filter
from data_prep.filters.caption_length import CaptionLengthConfig
from data_prep.filters.image_size import ImageSizeConfig
from data_prep.sources import Sample
from data_prep.uid import make_uid
from tests import stamps

if not stamps.ROOT.is_dir():
    pytest.skip("apt-get install tuxpaint-stamps-default", allow_module_level=True)

# Real stamp pixels made to the sizes the expected measures and reasons follow from.
GOOD_PNG = stamps.made_png((200, 151))  # kept by the default image_size stage
TINY = stamps.made_png((39, 7))  # shorter side 7 < the default min_side 16


def sample(image: bytes = GOOD_PNG, caption: str = "A stamp") -> Sample:
    source_id = f"bytes-{zlib.crc32(image)}"
    return Sample(uid=make_uid("test", source_id), source="test", source_id=source_id, image=image,
                  image_ext="png", caption=caption,
                  meta={"width": 1, "height": 1, "original_width": 1, "original_height": 1, "lang": "en"})


@pytest.fixture
def filters() -> list[Filter]:
    return [make_filter("image_size", ImageSizeConfig()), make_filter("caption_length", CaptionLengthConfig())]


def test_good_sample_is_kept_with_measures(filters):
    v = apply_filters(filters, sample())
    assert v.kept and v.measures == {"width": 200, "height": 151, "aspect_ratio": pytest.approx(200 / 151),
                                     "image_bytes": len(GOOD_PNG), "caption_words": 2, "caption_chars": 7}


@pytest.mark.parametrize("image, reason", [
    (TINY, "too_small: shorter side 7 px < min_side 16"),  # 39x7
    (stamps.made_png((12, 36)), "too_small: shorter side 12 px < min_side 16"),  # 12x36
    (stamps.made_png((694, 2348)), "bad_aspect: 3.38 > max_aspect 3.0"),  # 694x2348
])
def test_image_size_rejects_tiny_and_elongated_stamps(filters, image, reason):
    v = apply_filters(filters, sample(image))
    assert (v.filter, v.reason) == ("image_size", reason)


def test_corrupt_image_is_recorded_not_raised(filters):
    v = apply_filters(filters, sample(GOOD_PNG[:400]))  # truncated
    assert not v.kept and v.filter == "image_size" and v.reason.startswith("decode_error: ")
    v = apply_filters(filters, sample(b"not an image"))
    assert v.reason.startswith("decode_error: UnidentifiedImageError")


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
    bad = sample(TINY, caption="")
    cfg = load_config([])
    assert list(cfg.filters) == ["caption_length", "image_size"]
    v = apply_filters([make_filter(n, c) for n, c in cfg.filters.items()], bad)
    assert v.filter == "caption_length" and "width" not in v.measures  # image_size never ran
    cfg = load_config(["~filters.caption_length", "+filters.caption_length={}"])  # now runs second
    assert list(cfg.filters) == ["image_size", "caption_length"]
    v = apply_filters([make_filter(n, c) for n, c in cfg.filters.items()], bad)
    assert v.filter == "image_size" and "caption_words" not in v.measures


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


def test_undecodable_image_without_image_stage_is_rejected_at_write(tmp_path):
    """With no image stage configured, a broken image still never reaches a shard: re-encoding it for
    the shard fails and the sample is recorded under the ``write`` stage."""
    from data_prep.sources.tuxpaint import TuxPaint, TuxPaintConfig
    from data_prep.worker import Context, process_items

    cfg = load_config([f"out_dir={tmp_path}", "~filters.image_size", "resize.size=64"])
    ctx = Context.create(cfg)
    good, bad = sample(), sample(b"broken")
    rec = process_items(ctx, TuxPaint(TuxPaintConfig(root=str(stamps.ROOT))), iter([good, bad]))
    by_uid = {r["uid"]: r for r in rec.rows}
    assert by_uid[good.uid]["kept"] and [k.sample.uid for _, k in rec.kept] == [good.uid]
    assert by_uid[bad.uid]["filter"] == "write" and by_uid[bad.uid]["reason"].startswith("decode_error")
