"""Fuzzing the training stream's shard reader with hypothesis (bounded and derandomized for CI).

Inputs start from real samples of the small build and are damaged: tars with odd member names,
links, duplicate and pickle keys, then truncated, bit-flipped, gzipped or replaced by noise;
samples with corrupt or oversized images, huge or non-UTF-8 captions, and bad json metadata.
Property: nothing raises out of the reader but a ``ValueError`` naming a bad sample (which the
stream skips and counts) or, when a whole dataset holds nothing usable, the stream's own
``RuntimeError``; and every example finishes quickly (no hang: per-example deadline, test timeout).
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_prep.atomic import sha256_file
from data_prep.manifest import Manifest, ShardInfo
from pretrain.data import Tokenizer, image_transform
from pretrain.data.shard_samples import MAX_IMAGE_SIDE, parse_sample, read_tar
from pretrain.data.stream import ShardStream
from tests.chaos.tar_kit import real_samples

IMAGE_SIZE, CONTEXT = 16, 8
FUZZ = settings(max_examples=150, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRANSFORM = image_transform(IMAGE_SIZE)


class Seeds(dict):
    def __repr__(self) -> str:  # a failing example's report shows this, not megabytes of images
        return f"Seeds({', '.join(f'{k}: {len(v)}' for k, v in self.items())})"


@pytest.fixture(scope="module")
def seeds(small_build) -> dict[str, list[bytes]]:
    """Real bytes to damage: images (as built, re-encoded as JPEG/WebP, and stretched to extreme
    shapes), captions and json metadata."""
    samples = real_samples(small_build.manifests["train"], 6)
    pngs = [s["png"] for s in samples]
    image = Image.open(io.BytesIO(pngs[0])).convert("RGB")
    other = []
    for fmt, size in (("JPEG", None), ("WEBP", None), ("PNG", (1, MAX_IMAGE_SIDE + 1)), ("PNG", (MAX_IMAGE_SIDE, 2))):
        buf = io.BytesIO()
        (image.resize(size) if size else image).save(buf, format=fmt)
        other.append(buf.getvalue())
    return Seeds(image=pngs + other, txt=[s["txt"] for s in samples], json=[s["json"] for s in samples])


def damaged(data: bytes, draw: st.DrawFn) -> bytes:
    """``data`` kept, truncated, bit-flipped, padded with noise, or replaced by noise."""
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip", "append", "noise"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "flip":
        out = bytearray(data)
        for pos in draw(st.lists(st.integers(0, max(0, len(out) - 1)), max_size=8)):
            if out:
                out[pos] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "append":
        return data + draw(st.binary(max_size=64))
    if how == "noise":
        return draw(st.binary(max_size=512))
    return data


def caption(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> bytes:
    return draw(st.one_of(
        st.sampled_from(seeds["txt"]),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates: invalid UTF-8
        st.binary(max_size=200),
        st.integers(0, 200_000).map(lambda n: b"a " * n),  # up to 400 KB: over the caption limit
        st.just(b"   "),
    ))


def metadata(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> bytes:
    return draw(st.one_of(
        st.sampled_from(seeds["json"]),
        st.sampled_from([b"[]", b"null", b"{", b'{"uid": 7}', b'{"uid": ""}', b"\xff\xfe{}", b"[" * 100_000]),
        st.builds(lambda v: json.dumps({"uid": v}).encode(), st.one_of(st.text(max_size=300), st.integers())),
        st.binary(max_size=100),
    ))


@st.composite
def raw_samples(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> dict:
    """A real sample (image, caption, metadata) with up to three defects."""
    i = draw(st.integers(0, len(seeds["txt"]) - 1))
    sample: dict = {"__key__": draw(st.text(min_size=1, max_size=20)), "__url__": "fuzz.tar",
                    "png": seeds["image"][i], "txt": seeds["txt"][i], "json": seeds["json"][i]}
    for defect in draw(st.lists(st.sampled_from(["image", "image", "drop", "caption", "json", "extra"]), max_size=3)):
        if defect == "image":
            sample["png"] = damaged(draw(st.sampled_from(seeds["image"])), draw)
        elif defect == "drop":
            sample.pop(draw(st.sampled_from(["png", "txt", "json"])), None)
        elif defect == "caption":
            sample["txt"] = caption(draw, seeds)
        elif defect == "json":
            sample["json"] = metadata(draw, seeds)
        else:  # another image key, preferred over png: the reader must pick one and cope
            sample[draw(st.sampled_from(["jpg", "jpeg", "webp"]))] = damaged(draw(st.sampled_from(seeds["image"])), draw)
    return sample


def check_parse(raw: dict) -> bool:
    """Parse one raw sample: a normal result, or a ValueError naming the problem. True if usable."""
    try:
        image, text, uid = parse_sample(raw, TRANSFORM)
    except ValueError as e:
        assert str(e), "an error must say what is wrong"
        event(f"skipped: {type(e.__cause__).__name__ if e.__cause__ else 'check'}")  # --hypothesis-show-statistics
        return False
    event("usable")
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32  # (3, H, W)
    assert text and isinstance(uid, str) and uid
    return True


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_fuzz_samples(seeds, data: st.DataObject) -> None:
    check_parse(data.draw(raw_samples(seeds)))


def real_members(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of a few real samples, some with a defect."""
    out = []
    for n in range(draw(st.integers(0, 6))):
        raw = draw(raw_samples(seeds)) if draw(st.booleans()) else {"png": seeds["image"][n % 6],
                                                                     "txt": seeds["txt"][n % 6], "json": seeds["json"][n % 6]}
        for ext, data in raw.items():
            if not ext.startswith("__"):
                out.append((regular(f"s{n}.{ext}", len(data)), data))
    return out


def regular(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def odd_member(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> tuple[tarfile.TarInfo, bytes]:
    """A member a shard writer would not produce: odd names, pickle keys, links, devices."""
    key = draw(st.sampled_from(["s0", "s1", "dir/s2", "S3", "..", "/abs", "\u00e9t\u00e9", "x.y", ""]))
    ext = draw(st.sampled_from(["png", "PNG", "jpg", "txt", "json", "pyd", "pth", "seg.png", ""]))
    info = regular(f"{key}.{ext}" if ext else key, 0)
    info.type = draw(st.sampled_from([tarfile.REGTYPE] * 4 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                              tarfile.FIFOTYPE, tarfile.CHRTYPE]))
    if info.type != tarfile.REGTYPE:
        info.linkname = "/etc/passwd"
        return info, b""
    base = ext.lower().rpartition(".")[2]
    data = (caption(draw, seeds) if base == "txt" else metadata(draw, seeds) if base == "json"
            else damaged(draw(st.sampled_from(seeds["image"])), draw) if base in ("png", "jpg")
            else draw(st.binary(max_size=64)))
    info.size = len(data)
    return info, data


@st.composite
def tars(draw: st.DrawFn, seeds: dict[str, list[bytes]]) -> bytes:
    """Real samples with odd members spliced in, as a (maybe gzipped) tar, maybe damaged."""
    members = real_members(draw, seeds)
    for _ in range(draw(st.integers(0, 3))):
        members.insert(draw(st.integers(0, len(members))), odd_member(draw, seeds))
    buf = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            try:
                tar.addfile(info, io.BytesIO(data))
            except ValueError:  # a name this tar format cannot store
                pass
    out = buf.getvalue()
    if draw(st.booleans()):
        out = gzip.compress(out, mtime=0)
    return damaged(out, draw) if draw(st.booleans()) else out


@pytest.fixture(scope="module")
def tokenizer(small_build) -> Tokenizer:
    return Tokenizer(small_build.tokenizer_path, CONTEXT)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_fuzz_tars_through_the_stream(seeds, tokenizer, shard_dir: Path, data: st.DataObject) -> None:
    shard = shard_dir / "shard.tar"
    shard.write_bytes(data.draw(tars(seeds)))
    claimed = data.draw(st.integers(1, 9))  # what the manifest says; the tar may hold more or fewer
    problems: list[str] = []
    raws = list(read_tar(str(shard), 0, claimed, problems.append))
    assert len(raws) <= claimed
    usable = sum(check_parse(r) for r in raws)
    assert len(raws) == claimed or problems, "a shard ending short of the manifest is reported"
    event(f"tar: {'short' if problems else 'complete'}, {min(usable, 2)}+ usable")

    manifest = Manifest(shards=[ShardInfo("shard.tar", claimed, shard.stat().st_size, sha256_file(shard))], root=shard_dir)
    stream = ShardStream(manifest, tokenizer, TRANSFORM, batch_size=2, rank=0, world_size=1, workers=1,
                         seed=0, shuffle_buffer=data.draw(st.integers(0, 4)))
    batches = iter(stream)
    try:
        for _ in range(3):
            batch = next(batches)
            assert batch["images"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # (B, 3, H, W)
            assert batch["tokens"].shape == (2, CONTEXT)  # (B, L)
    except RuntimeError as e:
        assert "no usable sample" in str(e) and usable < 2, e
