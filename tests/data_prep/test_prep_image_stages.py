"""Image stages on real Tux Paint stamps: size measures and reasons, decompression bombs, resize-on-write,
exact and near duplicates. Synthetic bytes only for malformed files and exact Hamming arithmetic."""
from __future__ import annotations

import io
import math
import struct
import time
import zlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile, ImageOps

from data_prep import images
from data_prep.filters import FILTERS, apply_filters, make_filter
from data_prep.filters import near_duplicate as nd
from data_prep.filters.base import Reject
from data_prep.filters.duplicates import DuplicateConfig
from data_prep.filters.image_size import ImageSizeConfig
from data_prep.filters.near_duplicate import NearDuplicateConfig
from data_prep.resize import ResizeConfig, decode_need, encode_for_shard, output_size
from data_prep.sources.base import Sample
from data_prep.uid import make_uid
from tests import stamps

if not stamps.ROOT.is_dir():
    pytest.skip("apt-get install tuxpaint-stamps-default", allow_module_level=True)

# Real stamp pixels (RGBA, transparent background) made to the sizes the expected numbers follow from.
NANDOU = stamps.made_png((200, 151))  # 30200 px; shorter side 151: < Wukong's 201, < 256 (never upscaled)
BRADLEY = stamps.made_png((460, 400))  # both sides > 200 (Wukong keeps it); not square (a center crop cuts it)
PARATROOPER = stamps.made_png((917, 975))  # big enough that its JPEG decodes at 1/8 or 1/4 scale
TINY = stamps.made_png((39, 7))  # shorter side 7 < the default min_side 16
ELONGATED = stamps.made_png((694, 2348))  # aspect 3.38 > the default max_aspect 3


def sample(data: bytes, source_id: str | None = None, caption: str = "a stamp", url: str | None = None,
           source: str = "test") -> Sample:
    source_id = source_id or f"bytes-{zlib.crc32(data)}"
    return Sample(uid=make_uid(source, source_id), source=source, source_id=source_id, image=data, image_ext="png",
                  caption=caption, url=url, meta={"lang": "en"})


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **params)
    return out.getvalue()


def as_jpeg(png: bytes, quality: int = 90, scale: float = 1.0) -> bytes:
    """A stamp composited on white, optionally resized, written as JPEG."""
    im = images.on_white(Image.open(io.BytesIO(png)))
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    return encode(im, "JPEG", quality=quality)


def unlike(a: Image.Image, b: Image.Image) -> bool:
    """Whether two pictures clearly differ, judged on pixels (no pHash): composited on white, ``b`` at
    ``a``'s size, their mean absolute difference is above 40 of 255."""
    x, y = (np.asarray(images.on_white(im).convert("RGB").resize(a.size), float) for im in (a, b))
    return np.abs(x - y).mean() > 40


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def table_of(samples: list[Sample], measures: list[dict]) -> pa.Table:
    cols = {"uid": [s.uid for s in samples], "source": [s.source for s in samples]}
    for key in measures[0]:
        cols[key] = [m.get(key) for m in measures]
    return pa.table(cols)


def judge(stage_name: str, samples: list[Sample], alive=None, cfg=None) -> list[str | None]:
    stage = make_filter(stage_name, cfg or FILTERS[stage_name].Config())
    table = table_of(samples, [stage.measure(s) for s in samples])
    return stage.global_reasons(table, np.ones(len(samples), bool) if alive is None else np.asarray(alive))


# ---------------------------------------------------------------- image_size


def test_image_size_measures_the_original_file():
    s = sample(NANDOU)
    v = apply_filters([make_filter("image_size", ImageSizeConfig())], s)
    assert v.kept and v.measures == {"width": 200, "height": 151, "aspect_ratio": pytest.approx(200 / 151),
                                     "image_bytes": len(NANDOU)}
    assert s.decoded is not None and s.decoded.size == (200, 151)  # cached for the later image stages


def _truncated_jpeg() -> bytes:
    data = as_jpeg(BRADLEY)
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, cfg, reason", [
    (b"", {}, "empty_file: zero-byte image"),
    (NANDOU, {"min_bytes": 100_000}, f"too_few_bytes: {len(NANDOU)} bytes < min_bytes 100000"),
    (NANDOU, {"max_pixels": 30_000}, "too_many_pixels: 200x151 = 30200 > max_pixels 30000"),
    (png_claiming(10_000, 10_000), {}, "too_many_pixels: 10000x10000 = 100000000 > max_pixels 89478485"),
    (png_claiming(100_000, 100_000), {}, "too_many_pixels: Image size (10000000000 pixels) exceeds limit"),
    (NANDOU[:400], {}, "decode_error: "),  # truncated PNG
    ("truncated jpeg", {}, "decode_error: OSError: "),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), {}, "decode_error: UnidentifiedImageError"),
    (TINY, {}, "too_small: shorter side 7 px < min_side 16"),  # 39x7
    (ELONGATED, {}, "bad_aspect: 3.38 > max_aspect 3.0"),  # 694x2348
])
def test_image_size_reasons(data, cfg, reason):
    data = _truncated_jpeg() if data == "truncated jpeg" else data
    v = apply_filters([make_filter("image_size", ImageSizeConfig(**cfg))], sample(data))
    assert v.filter == "image_size" and v.reason.startswith(reason)


def test_wukong_rule_is_min_side_201_and_max_aspect_3():
    wukong = [make_filter("image_size", ImageSizeConfig(min_side=201, max_aspect=3.0))]
    assert apply_filters(wukong, sample(NANDOU)).reason == "too_small: shorter side 151 px < min_side 201"
    assert apply_filters(wukong, sample(BRADLEY)).kept  # 460x400: both sides > 200


def test_bomb_is_rejected_from_the_header_without_decoding(monkeypatch):
    def no_decode(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for bomb in (png_claiming(10_000, 10_000), png_claiming(60_000, 50_000)):
        s = sample(bomb)
        start = time.perf_counter()
        with pytest.raises(Reject, match="^too_many_pixels: "):
            images.decode(s)
        assert time.perf_counter() - start < 0.1 and s.decoded is None


def test_one_decode_serves_every_image_stage_and_the_shard(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # pixels still to decode (a loaded image's load() is a no-op)
            loads.append(self.format)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    s = sample(BRADLEY)
    apply_filters([make_filter("image_size", ImageSizeConfig()), make_filter("near_duplicate", NearDuplicateConfig())], s)
    data, ext, size = encode_for_shard(s, ResizeConfig(size=128))
    assert loads == ["PNG"] and size == (147, 128) and Image.open(io.BytesIO(data)).size == size


def test_reduced_jpeg_decode_keeps_the_original_measures():
    s = sample(as_jpeg(PARATROOPER))  # 917x975
    stage = make_filter("image_size", ImageSizeConfig())
    stage.decode_need = decode_need(ResizeConfig(size=64))
    assert stage.measure(s)["width"] == 917 and stage.measure(s)["height"] == 975
    assert s.decoded.size == (115, 122)  # decoded at 1/8 scale: still >= the 64 px needed
    assert images.decode(s) is s.decoded  # no need stated: the cached decode serves
    bigger = images.decode(s, need=decode_need(ResizeConfig(size=400)))  # too small for this: decoded again
    assert bigger.size == (459, 488) and images.original_size(bigger) == (917, 975)


@pytest.mark.parametrize("cfg, field", [
    ({"min_side": 0}, "min_side"), ({"max_aspect": 0.5}, "max_aspect"), ({"min_bytes": -1}, "min_bytes"),
    ({"max_pixels": 10}, "max_pixels"),
])
def test_image_size_config_errors_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ImageSizeConfig(**cfg)


# ---------------------------------------------------------------- resize-on-write


@pytest.mark.parametrize("mode, size", [
    ("keep_ratio", (85, 64)), ("keep_ratio_largest", (64, 48)), ("center_crop", (64, 64)), ("border", (64, 64)),
])
def test_resize_modes_on_a_real_stamp(mode, size):
    cfg = ResizeConfig(size=64, mode=mode)
    data, ext, written = encode_for_shard(sample(NANDOU), cfg)  # 200x151
    im = Image.open(io.BytesIO(data))
    assert (ext, im.format, im.size, written, output_size((200, 151), cfg)) == ("png", "PNG", size, size, size)
    if mode.startswith("keep_ratio"):
        assert abs(im.width / im.height - 200 / 151) < 0.02
    if mode == "border":  # 64x48 picture, centred: 8 rows of opaque white above and below
        px = np.asarray(im.convert("RGBA"))
        assert (px[:8] == 255).all() and (px[-8:] == 255).all() and not (px[8:56] == 255).all()


def test_center_crop_keeps_the_middle():
    im = images.on_white(Image.open(io.BytesIO(BRADLEY)))  # 460x400: the centred 400x400 square, scaled to 100
    data, _, _ = encode_for_shard(sample(encode(im, "PNG")), ResizeConfig(size=100, mode="center_crop"))
    expected = im.crop((30, 0, 430, 400)).resize((100, 100), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(Image.open(io.BytesIO(data)), float) - np.asarray(expected, float))
    assert diff.mean() < 2


def test_jpg_output_composites_transparency_on_white():
    rgba = Image.open(io.BytesIO(NANDOU)).convert("RGBA")
    data, ext, size = encode_for_shard(sample(NANDOU), ResizeConfig(format="jpg"))
    out = np.asarray(Image.open(io.BytesIO(data)), float)
    alpha = np.asarray(rgba)[..., 3]
    assert ext == "jpg" and size == (200, 151) and Image.open(io.BytesIO(data)).mode == "RGB"
    assert out[alpha == 0].mean() > 250  # transparent background -> white, not black
    opaque = np.asarray(rgba)[..., :3][alpha == 255].astype(float)
    assert np.abs(out[alpha == 255] - opaque).mean() < 8  # the picture itself is unchanged


def test_only_if_bigger_never_upscales():
    s = sample(NANDOU)  # 200x151, shorter side below 256
    data, ext, size = encode_for_shard(s, ResizeConfig(size=256))
    assert data is s.image and (ext, size) == ("png", (200, 151))
    data, _, size = encode_for_shard(sample(NANDOU), ResizeConfig(size=256, only_if_bigger=False))
    assert size == (339, 256) == Image.open(io.BytesIO(data)).size


def test_keep_format_returns_the_original_bytes():
    for data in (NANDOU, as_jpeg(BRADLEY)):
        s = sample(data)
        out, ext, _ = encode_for_shard(s, ResizeConfig())
        assert out is s.image and ext == Image.open(io.BytesIO(data)).format.lower().replace("jpeg", "jpg")
    with pytest.raises(Reject, match="^decode_error: "):  # still checked when no image stage decoded it
        encode_for_shard(sample(NANDOU[:2000]), ResizeConfig())
    gif = encode(Image.open(io.BytesIO(NANDOU)), "GIF")  # not a shard format: written as PNG, pixels unchanged
    out, ext, _ = encode_for_shard(sample(gif), ResizeConfig())
    assert ext == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(out)).convert("RGBA")),
                                           np.asarray(Image.open(io.BytesIO(gif)).convert("RGBA")))


def test_reduced_jpeg_decode_matches_a_full_decode():
    jpeg = as_jpeg(PARATROOPER)  # 917x975 -> 1/4 scale decode for a 128 px target
    cfg = ResizeConfig(size=128, format="png")
    fast, _, size = encode_for_shard(sample(jpeg), cfg)
    full = sample(jpeg)
    images.decode(full)  # cached at full size, so encode_for_shard resamples from all pixels
    slow, _, _ = encode_for_shard(full, cfg)
    a, b = (np.asarray(Image.open(io.BytesIO(x)), float) for x in (fast, slow))
    psnr = 10 * math.log10(255**2 / np.mean((a - b) ** 2))
    assert size == (128, 136) and psnr > 35


@pytest.mark.parametrize("cfg, field", [
    ({"size": 0}, "size"), ({"mode": "stretch"}, "mode"), ({"format": "gif"}, "format"), ({"quality": 101}, "quality"),
])
def test_resize_config_errors_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ResizeConfig(**cfg)


# ---------------------------------------------------------------- exact duplicates


def test_same_bytes_under_two_uids_keeps_the_first():
    # Tux Paint ships some stamps in two folders, byte for byte: a real stamp under two source ids.
    real = stamps.plain(1)[0]
    data = real.path.read_bytes()
    first, other, copy = sample(data, real.rel), sample(NANDOU), sample(data, f"copy/{real.path.name}")
    assert judge("duplicate_image", [first, other, copy]) == [None, None, f"duplicate_image: same bytes as {first.uid}"]
    # Only alive rows count: with the first one gone, the copy is the first occurrence.
    assert judge("duplicate_image", [first, other, copy], alive=[False, True, True]) == [None, None, None]


def test_same_url_and_caption_keeps_the_first():
    caption = stamps.plain(1)[0].caption
    url = "https://example.org/stamp.png"
    rows = [sample(b"", "r0", caption, url), sample(b"", "r1", caption + "!", url),  # other caption: kept
            sample(b"", "r2", caption, url), sample(b"", "r3", caption, None), sample(b"", "r3", caption, None, "other")]
    reasons = judge("duplicate_pair", rows)
    # Without a url the (source, source_id) pair is the address: r3 under two sources is not a repeat.
    assert reasons == [None, None, f"duplicate_pair: same url and caption as {rows[0].uid}", None, None]


def test_first_occurrence_matches_a_dictionary_on_many_rows():
    rng = np.random.default_rng(0)
    n = 200_000
    keys = [f"{k:016x}" for k in rng.integers(0, 50_000, n)]
    keys[5] = None  # not measured: never a duplicate
    alive = rng.random(n) < 0.8
    table = pa.table({"uid": [f"u{i}" for i in range(n)], "source": ["s"] * n, "image_key": keys})
    stage = make_filter("duplicate_image", DuplicateConfig())
    start = time.perf_counter()
    got = stage.global_reasons(table, alive)
    assert time.perf_counter() - start < 5
    seen: dict[str, int] = {}
    expected = []
    for i, (k, a) in enumerate(zip(keys, alive)):
        if not a or k is None:
            expected.append(None)
        elif k in seen:
            expected.append(f"duplicate_image: same bytes as u{seen[k]}")
        else:
            seen[k] = i
            expected.append(None)
    assert got == expected and stage.summary["duplicates"] == sum(r is not None for r in expected)


# ---------------------------------------------------------------- near duplicates


def test_near_duplicates_of_a_real_stamp_are_caught_and_other_stamps_are_not():
    # Stamps judged on pixels, not by the pHash under test: one 100+ px (re-encodes keep its pHash) and
    # clearly unlike its mirror image, and one from another folder clearly unlike it.
    def asymmetric(s: stamps.Stamp) -> bool:
        return stamps.is_plain(s) and min(s.width, s.height) >= 100 and unlike(s.image(), ImageOps.mirror(s.image()))
    real = stamps.find("plain, 100+ px, unlike its mirror", asymmetric)
    im, data = real.image(), real.path.read_bytes()
    folder = real.rel.split("/")[0]
    other = stamps.find("plain, in another folder, unlike the first",
                        lambda s: stamps.is_plain(s) and s.rel.split("/")[0] != folder and unlike(im, s.image()))
    base = sample(data)
    ninety = (round(im.width * 0.9), round(im.height * 0.9))
    rows = [base,
            sample(encode(ImageOps.mirror(im), "PNG")),  # the same picture facing the other way
            sample(as_jpeg(data, quality=75)),  # re-encoded as JPEG on white
            sample(other.path.read_bytes()),
            sample(encode(im.resize(ninety, Image.Resampling.LANCZOS), "PNG"))]  # 90 %
    reasons = judge("near_duplicate", rows)
    assert reasons[0] is None and reasons[1] is None and reasons[3] is None
    for r in (reasons[2], reasons[4]):
        assert r.startswith("near_duplicate: phash distance ") and r.endswith(f" to {base.uid}")
        assert int(r.split()[3]) <= 4
    # The original gone (an earlier stage rejected it): the JPEG copy is kept, the resized one names it.
    reasons = judge("near_duplicate", rows, alive=[False, True, True, True, True])
    assert reasons[:4] == [None, None, None, None] and reasons[4].endswith(f" to {rows[2].uid}")


def _hash_table(hexes: list[str | None]) -> pa.Table:
    return pa.table({"uid": [f"u{i}" for i in range(len(hexes))], "source": ["s"] * len(hexes), "phash": hexes})


def test_near_duplicate_greedy_counts_only_kept_rows():
    # a=0; b is 4 bits from a; c is 4 bits from b but 8 from a; d repeats b; e repeats a.
    a, b, c = 0, 0b1111, 0b11111111
    hexes = [f"{h:016x}" for h in (a, b, c, b, a)] + [None]
    stage = make_filter("near_duplicate", NearDuplicateConfig(max_distance=4))
    assert stage.global_reasons(_hash_table(hexes), np.ones(6, bool)) == [
        None, "near_duplicate: phash distance 4 to u0",
        None,  # close only to b, which was rejected
        "near_duplicate: phash distance 4 to u0",  # a repeat of a rejected hash: rejected by the same row
        "near_duplicate: phash distance 0 to u0", None]
    # The nearest earlier kept row is named: q is 4 bits from u0 and 2 from u1 (6 bits apart, both kept).
    hexes = [f"{h:016x}" for h in (0, 0b111111, 0b001111)]
    assert stage.global_reasons(_hash_table(hexes), np.ones(3, bool))[2] == "near_duplicate: phash distance 2 to u1"


def test_phash_column_must_hold_16_hex_digits():
    stage = make_filter("near_duplicate", NearDuplicateConfig())
    with pytest.raises(ValueError, match="row 1 holds 'xyz'"):
        stage.global_reasons(_hash_table(["0" * 16, "xyz"]), np.ones(2, bool))
    assert nd.hex64(pa.array(["00000000000000ff", "FFFFFFFFFFFFFFFF"]))[0].tolist() == [255, 2**64 - 1]


class RealHashes(NamedTuple):
    hashes: np.ndarray  # (H,) uint64: the distinct pHashes of the stamps and of their copies, sorted
    hashed: int  # stamps hashed
    moved: np.ndarray  # (M, 2) uint64: distinct (stamp, copy) hash pairs where the copy's hash differs


@pytest.fixture(scope="module")
def real_hashes() -> RealHashes:
    """pHashes of every 3rd stamp on disk and of JPEG/resized copies of a third of them (so close pairs exist)."""
    stage = make_filter("near_duplicate", NearDuplicateConfig())
    hashed = stamps.all_stamps()[::3]
    hexes = [stage.measure(sample(s.path.read_bytes()))["phash"] for s in hashed]
    copies = [(x, stage.measure(sample(as_jpeg(s.path.read_bytes(), 60, 0.8)))["phash"])
              for s, x in zip(hashed[::3], hexes[::3]) if min(s.width, s.height) > 32]
    pairs = np.stack([nd.hex64(pa.array(column))[0] for column in zip(*copies)], axis=1)
    all_hashes = nd.hex64(pa.array(hexes + [copy for _, copy in copies]))[0]
    return RealHashes(np.unique(all_hashes), len(hashed), np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0))


@pytest.mark.parametrize("bucket", [32, 2])  # 2: cut every bucket again, exercising the refinement
@pytest.mark.parametrize("d", [0, 2, 4, 8])
def test_banding_finds_exactly_the_brute_force_pairs(real_hashes, monkeypatch, d, bucket):
    monkeypatch.setattr(nd, "BUCKET", bucket)
    h = real_hashes.hashes
    a, b, dist, _ = nd.close_pairs(h, d)
    i, j = np.triu_indices(len(h), k=1)
    close = np.bitwise_count(h[i] ^ h[j]) <= d
    # Nearly every stamp is a picture of its own. The copies plant close pairs: most copies whose hash
    # moved stay within 4 bits of their stamp's.
    moved = real_hashes.moved
    planted = np.bitwise_count(moved[:, 0] ^ moved[:, 1]) <= d
    assert len(h) > 0.9 * real_hashes.hashed
    assert d < 4 or close.sum() >= planted.sum() > len(moved) / 2
    assert sorted(zip(a.tolist(), b.tolist())) == list(zip(i[close].tolist(), j[close].tolist()))
    assert np.array_equal(dist, np.bitwise_count(h[a] ^ h[b]))


def test_stages_are_registered_with_their_kind():
    kinds = {n: (FILTERS[n].needs_image, make_filter(n, FILTERS[n].Config()).is_global)
             for n in ("image_size", "duplicate_pair", "duplicate_image", "near_duplicate")}
    assert kinds == {"image_size": (True, False), "duplicate_pair": (False, True),
                     "duplicate_image": (True, True), "near_duplicate": (True, True)}
    with pytest.raises(ValueError, match="^max_distance: "):
        NearDuplicateConfig(max_distance=17)


def test_greedy_rounds_match_a_sequential_walk():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 40))
        x, y = rng.integers(0, n, (2, 60))
        pairs = np.unique(np.stack([x[x < y], y[x < y]], axis=1), axis=0)  # (P, 2) distinct, a < b
        a, b = pairs[:, 0], pairs[:, 1]
        dist = rng.integers(0, 5, len(a))
        kept, target, tdist = nd.first_kept(n, a, b, dist)
        walked: list[int] = []
        for i in range(n):
            earlier = sorted((int(dist[k]), int(a[k])) for k in range(len(a)) if b[k] == i and a[k] in walked)
            if earlier:
                assert (kept[i], target[i], tdist[i]) == (False, earlier[0][1], earlier[0][0])
            else:
                walked.append(i)
                assert kept[i] and target[i] == -1


def test_near_duplicate_verdicts_scale_to_many_rows():
    rng = np.random.default_rng(1)
    n = 300_000
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    h[1::1000] = h[0::1000] ^ np.uint64(0b101)  # a 2-bit neighbour right after every 1000th row
    alive = np.ones(n, bool)
    stage = make_filter("near_duplicate", NearDuplicateConfig())
    start = time.perf_counter()
    reasons = stage.global_reasons(_hash_table([f"{x:016x}" for x in h]), alive)
    assert time.perf_counter() - start < 20
    hit = [i for i, r in enumerate(reasons) if r is not None]
    assert hit == list(range(1, n, 1000)) and reasons[1] == "near_duplicate: phash distance 2 to u0"
