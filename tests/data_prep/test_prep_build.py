"""End-to-end build on real data: shards, manifests, decisions, determinism, layout."""
from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep.build import build_from_overrides
from data_prep.manifest import ManifestError, load_manifest
from data_prep.sources import SourceError
from data_prep.sources.base import REQUIRED_META


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


def test_manifest_matches_files(small_build):
    for split, m in small_build.manifests.items():
        assert load_manifest(m.root) == m
        assert m.config["samples_per_shard"] == 100 and m.config["sources"]["tuxpaint"]["limit"] == 170
        assert all(s.samples == 100 for s in m.shards[:-1]) and 0 < m.shards[-1].samples <= 100
        for shard in m.shards:
            path = m.shard_path(shard)
            assert shard.bytes == path.stat().st_size
            assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard.samples == len(list(wds.WebDataset(str(path), shardshuffle=False)))
    assert small_build.manifests["train"].total_samples == 300 + 143  # see the funnel in report.md


def test_decisions_one_row_per_input(small_build):
    rows = pq.read_table(small_build.decisions_path).to_pylist()
    assert len(rows) == 300 + 170 and len({r["uid"] for r in rows}) == len(rows)
    by_id = {(r["source"], r["source_id"]): r for r in rows}
    drat = by_id["tuxpaint", "cartoon/tux/tux-drat.png"]
    assert (drat["kept"], drat["filter"], drat["reason"], drat["split"]) == (False, "source", "no_caption", None)
    fish = by_id["tuxpaint", "animals/fish/moonwrasse.png"]
    assert fish["filter"] == "image_size" and fish["reason"].startswith("bad_aspect")
    assert fish["aspect_ratio"] == pytest.approx(137 / 42) and fish["caption_words"] > 0  # text stage ran first
    assert drat["caption_words"] is None and drat["width"] is None  # rejected by its source: nothing measured
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


def test_report_has_funnel(small_build):
    report = small_build.report_path.read_text()
    assert "| tuxpaint      |   170 |       6 |               0 |           1 |        143 |           20 |" in report
    assert "no_caption" in report and "bad_aspect" in report


def test_empty_split_rebuild_and_no_writes_outside_out_dir(tmp_path, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    base = [f"out_dir={out}", "~sources.tuxpaint", "sources.fashion_mnist.limit=30"]
    build_from_overrides([*base, "samples_per_shard=10"])
    result = build_from_overrides([*base, "samples_per_shard=30"])
    assert os.listdir(cwd) == []  # hydra neither changed directory nor wrote logs here
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json", "shard-000000.tar"]  # stale removed
    assert result.manifests["heldout"].shards == []
    with pytest.raises(ManifestError, match="lists no samples"):
        load_manifest(out / "heldout")
    assert load_manifest(out / "heldout", allow_empty=True).total_samples == 0


def test_missing_root_fails_before_writing(tmp_path):
    with pytest.raises(SourceError, match=r"/no/such/dir.*apt-get install dataset-fashion-mnist"):
        build_from_overrides([f"out_dir={tmp_path / 'out'}", "sources.fashion_mnist.root=/no/such/dir"])
    assert not (tmp_path / "out").exists()
