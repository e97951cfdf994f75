"""The builder end to end over real HTTP: a URL table served from 127.0.0.1 with real Tux Paint
images and faults, resize on write, per-sample failure reasons, and a retry run that re-fetches only
the transient failures. Plus the ordering rule of global stages, on real Fashion-MNIST captions."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep.build import build_from_overrides
from data_prep.manifest import load_manifest
from tests import stamps as stamps_on_disk
from tests.data_prep.image_server import ImageServer

STAMPS = stamps_on_disk.ROOT
FAULTS = {  # path -> (reason code, retryable)
    "/fault/404": ("http_404", False),
    "/fault/html": ("wrong_type", False),
    "/fault/redirect-loop": ("redirect_loop", False),
    "/fault/noai": ("robots_noai", False),
    "/fault/truncated": ("truncated", True),
    "/fault/flaky?key=a&fails=1&status=503": ("http_503", True),
    "/fault/flaky?key=b&fails=1&status=503": ("http_503", True),
}


def stamps(n: int) -> list[tuple[str, str]]:
    """(relative path, real caption) of the first ``n`` plain stamps: every stage here keeps them."""
    return [(s.rel, s.caption) for s in stamps_on_disk.plain(n)]


def rows(server: ImageServer) -> list[dict]:
    good = [{"url": server.img_url(rel), "caption": cap} for rel, cap in stamps(40)]
    faults = [{"url": server.url(path), "caption": f"a fault {i}"} for i, path in enumerate(FAULTS)]
    odd = [
        {"url": server.url("/fault/empty"), "caption": "an empty file"},
        {"url": None, "caption": "no url at all"},
        {"url": good[0]["url"], "caption": None},
        dict(good[1]),  # the same url and caption again: an exact duplicate pair
    ]
    return good + faults + odd


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    with ImageServer(STAMPS) as server:
        table = rows(server)
        pq.write_table(pa.Table.from_pylist(table), folder / "pairs.parquet")
        out = folder / "data"
        overrides = [
            f"out_dir={out}", "~sources.fashion_mnist", "~sources.tuxpaint",
            "+sources.web.type=table", f"+sources.web.root={folder / 'pairs.parquet'}",
            "+sources.web.heldout_fraction=0.0", "filters=none",
            "+filters.caption_length={}", "+filters.duplicate_pair={}", "+filters.image_size={min_side: 8}",
            "resize.size=48", "resize.mode=keep_ratio", "resize.format=jpg",
            "download.retries=0", "download.timeout=3", "unit_size=20", "samples_per_shard=16",
            "tokenizer.vocab_size=120", "workers.processes=1",
        ]
        first = build_from_overrides(overrides)
        first_decisions = pq.read_table(first.decisions_path).to_pylist()
        first_report = first.report_path.read_text()  # the retry run below rewrites it
        hits_before = Counter(server.hits)
        second = build_from_overrides([*overrides, "retry_failed=true"])
        hits_after = Counter(server.hits)
        yield {"table": table, "first": first, "first_rows": first_decisions, "first_report": first_report, "second": second,
               "retried": hits_after - hits_before}


def test_every_fault_has_its_reason(served):
    by_url = {r["url"]: r for r in served["first_rows"] if r["url"]}
    for path, (code, retryable) in FAULTS.items():
        row = next(r for u, r in by_url.items() if u.endswith(path))
        assert (row["filter"], row["reason"].split(":")[0], row["retryable"]) == ("download", code, retryable), row
    reasons = Counter((r["filter"], (r["reason"] or "").split(":")[0]) for r in served["first_rows"])
    assert reasons[("image_size", "empty_file")] == 1
    assert reasons[("source", "no_url")] == 1 and reasons[("source", "no_caption")] == 1
    assert reasons[("duplicate_pair", "duplicate_pair")] == 1
    assert reasons[(None, "")] == 40  # every good stamp kept
    report = served["first_report"]
    for code in ("http_404", "wrong_type", "redirect_loop", "robots_noai", "truncated", "http_503", "no_url"):
        assert code in report


def test_kept_images_are_resized_jpegs_with_contract_meta(served):
    m = load_manifest(served["first"].out_dir / "train")
    samples = list(wds.WebDataset([str(m.shard_path(s)) for s in m.shards], shardshuffle=False))
    assert len(samples) == m.total_samples and all(s.samples == 16 for s in m.shards[:-1])
    for s in samples:
        meta = json.loads(s["json"])
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
            small = min(meta["original_width"], meta["original_height"])
            assert min(im.size) == min(48, small)  # keep_ratio: shorter side to 48, never upscaled
        assert meta["url"].startswith("http://127.0.0.1") and meta["lang"] == "und"


def test_retry_fetches_only_transient_failures(served):
    retried = served["retried"]
    assert retried["/fault/flaky"] == 2 and retried["/fault/truncated"] == 1
    assert not any(path.startswith("/img/") for path in retried)  # successes were not downloaded again
    assert retried["/fault/404"] == 0 and retried["/fault/noai"] == 0
    rows = {r["url"]: r for r in pq.read_table(served["second"].decisions_path).to_pylist() if r["url"]}
    flaky = [r for u, r in rows.items() if "/fault/flaky" in u]
    assert len(flaky) == 2 and all(r["kept"] for r in flaky)  # the server recovered: now kept
    assert served["second"].manifests["train"].total_samples == served["first"].manifests["train"].total_samples + 2


def test_global_stage_judges_only_what_survived_the_stages_before_it(tmp_path):
    """caption_frequency counts the samples alive when it runs; a sample two stages reject is recorded
    under the one that comes first in the config, whichever worker measured what."""
    base = [f"out_dir={tmp_path / 'a'}", "~sources.tuxpaint", "sources.fashion_mnist.limit=300",
            "filters=none", "workers.processes=1", "unit_size=64", "tokenizer.vocab_size=100"]
    freq_first = build_from_overrides([*base, "+filters.caption_frequency={max_count: 4}",
                                       "+filters.caption_length={min_words: 7}"], )
    rows = pq.read_table(freq_first.decisions_path).to_pylist()
    counts = Counter(r["caption_key"] for r in rows)
    for r in rows:
        if counts[r["caption_key"]] > 4:
            expected = f"too_frequent: caption occurs {counts[r['caption_key']]} times"
            assert r["filter"] == "caption_frequency" and r["reason"].startswith(expected)
        elif r["caption_words"] < 7:
            assert r["filter"] == "caption_length"
        else:
            assert r["kept"]
    assert {r["filter"] for r in rows} >= {"caption_frequency", "caption_length", None}

    length_first = build_from_overrides([f"out_dir={tmp_path / 'b'}", *base[1:],
                                         "+filters.caption_length={min_words: 7}",
                                         "+filters.caption_frequency={max_count: 4}"])
    rows = pq.read_table(length_first.decisions_path).to_pylist()
    alive = Counter(r["caption_key"] for r in rows if r["filter"] != "caption_length")
    for r in rows:
        if r["caption_words"] < 7:
            assert r["filter"] == "caption_length"
        else:  # counted among the survivors of caption_length only
            assert (r["filter"] == "caption_frequency") == (alive[r["caption_key"]] > 4)
