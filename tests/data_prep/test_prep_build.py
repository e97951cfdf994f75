"""End-to-end build on real data: shards, manifests, decisions, determinism, layout."""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep import sample_index
from data_prep.build import build_from_overrides
from data_prep.manifest import ManifestError, load_manifest
from data_prep.sources import SourceError
from data_prep.sources.base import REQUIRED_META
from tests import stamps


def read_split(folder) -> list[dict]:
    m = load_manifest(folder)
    return list(wds.WebDataset([str(m.shard_path(s)) for s in m.shards], shardshuffle=False))


def test_shards_hold_contract_keys(small_build):
    for split in ("train", "heldout"):
        samples = read_split(small_build.out_dir / split)
        assert samples
        for s in samples:
            meta = json.loads(s["json"])
            assert s["__key__"] == meta["uid"] and len(meta["uid"]) == 32
            assert {"uid", "source", "source_id", *REQUIRED_META} <= meta.keys()
            assert s["txt"].decode("utf-8").strip()
            with Image.open(io.BytesIO(s["png"])) as im:
                assert im.size == (meta["width"], meta["height"])
    # Shards mix the sources (units are interleaved in a seeded order), and every source's samples
    # keep their input order within a unit.
    first = read_split(small_build.out_dir / "train")[:200]
    assert {json.loads(s["json"])["source"] for s in first} == {"tuxpaint", "fashion_mnist"}


def kept_split_counts(build, source: str) -> Counter:
    """Kept samples per split of one source, from decisions.parquet."""
    rows = pq.read_table(build.decisions_path).to_pylist()
    return Counter(r["split"] for r in rows if r["source"] == source and r["kept"])


def test_manifest_matches_files(small_build, small_stamps):
    for split, m in small_build.manifests.items():
        assert load_manifest(m.root) == m
        assert m.config["samples_per_shard"] == 100
        assert m.config["sources"]["tuxpaint"]["root"] == str(small_stamps.root)
        assert all(s.samples == 100 for s in m.shards[:-1]) and 0 < m.shards[-1].samples <= 100
        for shard in m.shards:
            path = m.shard_path(shard)
            assert shard.bytes == path.stat().st_size
            assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard.samples == len(list(wds.WebDataset(str(path), shardshuffle=False)))
            # The sample index the builder wrote is the one the shard's own headers give.
            assert m.index_suffix == sample_index.SUFFIX
            assert sample_index.read_offsets(m.root, shard.name, shard.samples, shard.bytes) == sample_index.scan_offsets(path)[0]
    # Every plain stamp is kept, in one split or the other; every Fashion-MNIST image in train.
    tux = kept_split_counts(small_build, "tuxpaint")
    assert tux["train"] + tux["heldout"] == len(small_stamps.plain) and tux["heldout"] > 0
    assert small_build.manifests["train"].total_samples == 300 + tux["train"]
    assert small_build.manifests["heldout"].total_samples == tux["heldout"]


def test_decisions_one_row_per_input(small_build, small_stamps):
    rows = pq.read_table(small_build.decisions_path).to_pylist()
    assert len(rows) == 300 + small_stamps.inputs and len({r["uid"] for r in rows}) == len(rows)
    by_id = {(r["source"], r["source_id"]): r for r in rows}
    for rel in stamps.NO_CAPTION:
        r = by_id["tuxpaint", rel]
        assert (r["kept"], r["filter"], r["reason"], r["split"]) == (False, "source", "no_caption", None)
        assert r["caption_words"] is None and r["width"] is None  # rejected by its source: nothing measured
    for rel, code in stamps.IMAGE_SIZE_REJECTS.items():
        r = by_id["tuxpaint", rel]
        assert r["filter"] == "image_size" and r["reason"].startswith(code), r
        assert r["caption_words"] > 0  # the text stage ran first
    width, height = stamps.ELONGATED_SIZE
    assert by_id["tuxpaint", stamps.ELONGATED]["aspect_ratio"] == pytest.approx(width / height)
    assert all(by_id["tuxpaint", rel]["kept"] for rel in small_stamps.plain)
    for r in rows:
        assert r["kept"] == (r["reason"] is None) == (r["split"] is not None)
    kept = {r["uid"] for r in rows if r["kept"]}
    shard_keys = {s["__key__"] for split in ("train", "heldout") for s in read_split(small_build.out_dir / split)}
    assert kept == shard_keys


def test_heldout_is_disjoint_from_train(small_build):
    train = {s["__key__"] for s in read_split(small_build.out_dir / "train")}
    heldout = read_split(small_build.out_dir / "heldout")
    assert heldout and not train & {s["__key__"] for s in heldout}
    assert {json.loads(s["json"])["source"] for s in heldout} == {"tuxpaint"}  # fashion_mnist fraction is 0


def test_rebuild_is_identical(small_build, small_overrides, tmp_path):
    again = build_from_overrides([f"out_dir={tmp_path}", *small_overrides])
    for split, m in small_build.manifests.items():
        assert [(s.name, s.samples, s.sha256) for s in again.manifests[split].shards] == \
               [(s.name, s.samples, s.sha256) for s in m.shards]
    assert pq.read_table(again.decisions_path).equals(pq.read_table(small_build.decisions_path))
    assert again.tokenizer_path.read_bytes() == small_build.tokenizer_path.read_bytes()


def markdown_rows(text: str, first_header: str) -> dict[str, dict[str, str]]:
    """The markdown table of ``text`` whose first column is ``first_header``: first cell -> {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


def test_report_has_funnel(small_build, small_stamps):
    funnel = markdown_rows(small_build.report_path.read_text(), "source")
    tux = kept_split_counts(small_build, "tuxpaint")
    assert funnel["tuxpaint"] == {
        "source": "tuxpaint", "input": str(small_stamps.inputs), "-source": str(len(stamps.NO_CAPTION)),
        "-caption_length": "0", "-image_size": str(len(stamps.IMAGE_SIZE_REJECTS)),
        "kept train": str(tux["train"]), "kept heldout": str(tux["heldout"])}
    assert funnel["fashion_mnist"] == {
        "source": "fashion_mnist", "input": "300", "-source": "0", "-caption_length": "0", "-image_size": "0",
        "kept train": "300", "kept heldout": "0"}
    report = small_build.report_path.read_text()
    for code in ("no_caption", "bad_aspect", "too_small", "decode_error"):
        assert f"| {code} " in report, code


def test_empty_split_rebuild_and_no_writes_outside_out_dir(tmp_path, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    base = [f"out_dir={out}", "~sources.tuxpaint", "sources.fashion_mnist.limit=30"]
    build_from_overrides([*base, "samples_per_shard=10"])
    result = build_from_overrides([*base, "samples_per_shard=30"])
    assert os.listdir(cwd) == []  # hydra neither changed directory nor wrote logs here
    # Stale shards and their sample indexes removed.
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000000.tar.idx"]
    assert result.manifests["heldout"].shards == []
    with pytest.raises(ManifestError, match="lists no samples"):
        load_manifest(out / "heldout")
    assert load_manifest(out / "heldout", allow_empty=True).total_samples == 0


def test_missing_root_fails_before_writing(tmp_path):
    with pytest.raises(SourceError, match=r"/no/such/dir.*apt-get install dataset-fashion-mnist"):
        build_from_overrides([f"out_dir={tmp_path / 'out'}", "sources.fashion_mnist.root=/no/such/dir"])
    assert not (tmp_path / "out").exists()
