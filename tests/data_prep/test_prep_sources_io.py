"""Table, folder and WebDataset sources on real Tux Paint stamps, plus hostile and damaged inputs."""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.sources.base import REQUIRED_META, Rejected, Sample, SourceError
from data_prep.sources.folder import Folder, FolderConfig
from data_prep.sources.table import Table, TableConfig
from data_prep.sources.tuxpaint import read_caption
from data_prep.sources.webdataset import WebDataset, WebDatasetConfig
from tests import stamps as stamps_on_disk
from tests.data_prep.hostile import Trap, add_member

STAMPS = stamps_on_disk.ROOT
ROOT = Path(__file__).resolve().parents[2]


def _zh(txt: Path) -> str | None:
    line = next((x for x in txt.read_text("utf-8").splitlines() if x.startswith("zh_CN")), None)
    return line.split("=", 1)[1].strip() if line else None


@pytest.fixture(scope="module")
def stamps() -> list[tuple[Path, str]]:
    """~40 real stamps spread over all categories, with their real captions (some in Chinese)."""
    pngs = [s.path for s in stamps_on_disk.all_stamps() if s.caption is not None]
    # plus the first captions with a comma and with quotes: CSV quoting must round-trip them
    tricky = [next(p for p in pngs if ch in read_caption(p.with_suffix(".txt"))) for ch in ',"']
    picked = sorted(set(pngs[:: max(1, len(pngs) // 40)]) | set(tricky))
    out = []
    for i, p in enumerate(picked):
        zh = _zh(p.with_suffix(".txt")) if i % 5 == 0 else None
        out.append((p, zh or read_caption(p.with_suffix(".txt"))))
    assert len(out) >= 40 and any(not c.isascii() for _, c in out) and any('"' in c for _, c in out)
    return out


def _ok(items: list) -> list[Sample]:
    return [i for i in items if isinstance(i, Sample)]


def _reasons(items: list) -> list[str]:
    return [i.reason.split(":")[0] for i in items if isinstance(i, Rejected)]


# --------------------------------------------------------------------------------------------- table

def _write_table(path: Path, rows: list[dict], fmt: str) -> None:
    gz = path.suffix == ".gz"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix("") if gz else path)
        if gz:
            with open(path.with_suffix(""), "rb") as src, gzip.open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return
    f = gzip.open(path, "wt", encoding="utf-8", newline="") if gz else open(path, "w", encoding="utf-8", newline="")
    with f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        elif fmt == "tsv":  # plain TSV: no quoting, fields hold no tabs
            f.write("\t".join(rows[0]) + "\n")
            f.writelines("\t".join(str(v) for v in r.values()) + "\n" for r in rows)
        else:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _stamp_rows(stamps: list[tuple[Path, str]], table_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows whose url is a relative path, an absolute path, a file:// URL or an http URL, in turn."""
    rows, want = [], []
    for i, (png, cap) in enumerate(stamps):
        url = [os.path.relpath(png, table_dir), str(png), png.as_uri(), f"https://example.org/{png.name}"][i % 4]
        rows.append({"image": url, "text": cap, "category": png.relative_to(STAMPS).parts[0], "n": i})
        want.append(url if i % 4 >= 2 else str(png))
    return rows, want


@pytest.mark.parametrize("suffix", ["parquet", "parquet.gz", "csv", "csv.gz", "tsv", "jsonl", "jsonl.gz"])
def test_table_formats_read_the_same_samples(tmp_path, stamps, suffix):
    rows, want_urls = _stamp_rows(stamps, tmp_path)
    path = tmp_path / f"pairs.{suffix}"
    _write_table(path, rows, suffix.split(".")[0])
    cfg = TableConfig(root=str(path), url_col="image", caption_col="text", keep_columns=["category"])
    src = Table(cfg, name="laion_part1")
    units = src.plan(tmp_path / "work", unit_size=16)
    n = len(rows)
    assert units == [f"chunk-{i:06d}.parquet" for i in range((n + 15) // 16)]
    sizes = [pq.ParquetFile(tmp_path / "work/laion_part1" / u).metadata.num_rows for u in units]
    assert sizes == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    items = [i for u in units for i in src.read(u, tmp_path / "work")]
    assert len(_ok(items)) == n
    assert [s.caption for s in items] == [c for _, c in stamps]
    assert [s.url for s in items] == want_urls
    assert [s.source_id for s in items] == [str(i) for i in range(n)]
    s = items[0]
    assert s.image is None and s.image_ext == "" and s.source == "laion_part1"
    assert all(k in s.meta for k in REQUIRED_META) and s.meta["width"] is None
    assert [x.meta["category"] for x in items] == [r["category"] for r in rows]
    # uids depend only on (label, row): another work dir, another unit size, the same uids
    again = list(Table(cfg, name="laion_part1").items(tmp_path / "work2", unit_size=7))
    assert [x.uid for x in again] == [x.uid for x in items] and len({x.uid for x in items}) == n


def test_table_missing_column_names_it_and_lists_the_columns(tmp_path, stamps):
    rows, _ = _stamp_rows(stamps[:3], tmp_path)
    for fmt in ("csv", "parquet", "jsonl"):
        path = tmp_path / f"t.{fmt}"
        _write_table(path, rows, fmt)
        with pytest.raises(SourceError, match=r"no column 'url' \(option url_col\).*\['image', 'text', 'category', 'n'\]"):
            Table(TableConfig(root=str(path), caption_col="text")).plan(tmp_path / fmt, 10)
        with pytest.raises(SourceError, match=r"keep_columns \['license'\]"):
            Table(TableConfig(root=str(path), url_col="image", caption_col="text",
                              keep_columns=["license"])).plan(tmp_path / fmt, 10)


def test_table_null_and_empty_values(tmp_path):
    png = str(stamps_on_disk.plain(1)[0].path)
    rows = [{"url": png, "caption": "A rhea."}, {"url": None, "caption": "x"}, {"url": "  ", "caption": "x"},
            {"url": png, "caption": None}, {"url": png, "caption": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    items = list(Table(TableConfig(root=str(tmp_path / "t.parquet"))).items(tmp_path / "w"))
    assert [type(i).__name__ for i in items] == ["Sample", "Rejected", "Rejected", "Rejected", "Sample"]
    assert [i.reason for i in items if isinstance(i, Rejected)] == ["no_url", "no_url", "no_caption"]
    assert items[-1].caption == ""  # empty captions are the caption stage's to reject


def test_table_bad_rows_are_rejected_not_fatal(tmp_path, stamps):
    png = str(stamps_on_disk.plain(1)[0].path)
    lines = [b'{"url": "%s", "caption": "A rhea."}' % png.encode(), b'{"url": "a.png", "caption": "cut',
             b"[1, 2]", b"", b'{"url": "b.png", "caption": "caf\xe9"}', b'{"url": "c.png", "caption": "ok"}']
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = list(Table(TableConfig(root=str(tmp_path / "t.jsonl"))).items(tmp_path / "w1"))
    assert [i.source_id for i in items] == ["0", "1", "2", "bad_row:2", "bad_row:3"]
    assert _reasons(items) == ["bad_row", "bad_row"] and "not JSON" in items[3].reason
    assert items[1].caption == "caf\udce9"  # undecodable byte kept for the caption stage to name
    assert items[1].url == str(tmp_path / "b.png")

    (tmp_path / "t.csv").write_text('url,caption\na.png,"A, b"\nb.png,x,extra\nc.png,"multi\nline"\nd.png\n')
    items = list(Table(TableConfig(root=str(tmp_path / "t.csv"))).items(tmp_path / "w2"))
    assert [i.caption for i in _ok(items)] == ["A, b", "multi\nline"]
    assert sorted(i.source_id for i in items if isinstance(i, Rejected)) == ["bad_row:3", "bad_row:5"]
    assert "bad_row: 3 fields where the header has 2" in [i.reason for i in items if isinstance(i, Rejected)]

    rows, _ = _stamp_rows(stamps, tmp_path)
    _write_table(tmp_path / "full.jsonl.gz", rows, "jsonl")
    data = (tmp_path / "full.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])  # a download cut short
    items = list(Table(TableConfig(root=str(tmp_path / "cut.jsonl.gz"), url_col="image", caption_col="text")).items(tmp_path / "w4"))
    assert 5 < len(_ok(items)) < len(rows) and [s.caption for s in _ok(items)] == [r["text"] for r in rows][: len(_ok(items))]
    assert _reasons(items) == ["bad_row"] and "rest of the table skipped" in items[-1].reason

    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(SourceError, match="not a readable CSV"):
        Table(TableConfig(root=str(tmp_path / "empty.csv"))).plan(tmp_path / "w3", 10)


def test_table_limit_replan_and_config_errors(tmp_path, stamps):
    rows, _ = _stamp_rows(stamps, tmp_path)
    _write_table(tmp_path / "t.csv", rows, "csv")
    src = Table(TableConfig(root=str(tmp_path / "t.csv"), url_col="image", caption_col="text", limit=10))
    work = tmp_path / "w"
    assert src.plan(work, 4) == ["chunk-000000.parquet", "chunk-000001.parquet", "chunk-000002.parquet"]
    chunk = work / "table/chunk-000000.parquet"
    mtime = chunk.stat().st_mtime_ns
    assert src.plan(work, 4) == ["chunk-000000.parquet", "chunk-000001.parquet", "chunk-000002.parquet"]
    assert chunk.stat().st_mtime_ns == mtime  # same table, same options: the chunks are reused
    assert src.plan(work, 6) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    assert sorted(p.name for p in (work / "table").glob("chunk-*")) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    assert len(list(src.items(work, 6))) == 10
    for kwargs, msg in [({"format": "xls"}, "format: 'xls' is not a table format; allowed: auto, parquet"),
                        ({"keep_columns": ["width"]}, "keep_columns: \\['width'\\] would overwrite"),
                        ({"caption_col": ""}, "caption_col: must name a column")]:
        with pytest.raises(ValueError, match=msg):
            TableConfig(**kwargs)
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(SourceError, match="set format to one of parquet, csv, tsv, jsonl"):
        Table(TableConfig(root=str(tmp_path / "t.xlsx")))


# Peak RSS from VmHWM: getrusage's ru_maxrss survives fork+exec, so it would report pytest's own peak.
_PLAN_AND_MEASURE = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    from data_prep.sources.table import Table, TableConfig
    units = Table(TableConfig(root=sys.argv[1])).plan(Path(sys.argv[2]), 100_000)
    hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
    print(len(units), hwm_kb // 1024)
""")


@pytest.mark.parametrize("fmt", ["csv.gz", "jsonl.gz"])
def test_table_plan_streams_a_million_rows(tmp_path, fmt):
    """1M rows of ~270 bytes (270 MB unpacked) plan in a process whose peak RSS stays far below that."""
    n, words = 1_000_000, "a photo of a small red bird sitting on a branch in the garden at dawn " * 3
    path = tmp_path / f"big.{fmt}"
    with gzip.open(path, "wt", compresslevel=1) as f:
        if fmt == "csv.gz":
            f.write("url,caption\n")
            f.writelines(f"https://example.org/{i}.jpg,{words}{i}\n" for i in range(n))
        else:
            f.writelines(f'{{"url": "https://example.org/{i}.jpg", "caption": "{words}{i}"}}\n' for i in range(n))
    out = subprocess.run([sys.executable, "-c", _PLAN_AND_MEASURE, str(path), str(tmp_path / "w")],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=120)
    n_units, peak_mb = map(int, out.stdout.split())
    assert n_units == 10
    assert peak_mb < 400, f"planning {fmt} peaked at {peak_mb} MB"
    last = pq.read_table(tmp_path / "w/table/chunk-000009.parquet")
    assert last.num_rows == 100_000 and last["row"][-1].as_py() == n - 1
    assert last["caption"][-1].as_py() == f"{words}{n - 1}".encode()


# -------------------------------------------------------------------------------------------- folder

def test_folder_source(tmp_path, stamps):
    root = tmp_path / "imgs"
    want = {}
    for i, (png, _) in enumerate(stamps[:16]):
        rel = png.relative_to(STAMPS)
        dst = root / rel.parent
        dst.mkdir(parents=True, exist_ok=True)
        if i % 4 == 1:  # a real JPEG, upper-case extension
            img = dst / f"{png.stem}.JPG"
            Image.open(png).convert("RGB").save(img, format="JPEG")
        else:
            img = dst / png.name
            shutil.copy(png, img)
        if i % 5 != 3:  # some images have no sidecar
            shutil.copy(png.with_suffix(".txt"), dst / f"{png.stem}.txt")
        want[img.relative_to(root).as_posix()] = i % 5 != 3
    (root / "notes.md").write_text("not an image")
    (root / "odd.png").write_bytes(b"\x89PNG")
    (root / "odd.txt").write_bytes(b"caf\xe9\n")
    want["odd.png"] = True

    src = Folder(FolderConfig(root=str(root)), name="my_folder")
    assert len(src) == len(want) and src.plan(tmp_path, 5) == ["0-5", "5-10", "10-15", "15-17"]
    items = list(src.items(tmp_path, 5))
    assert [i.source_id for i in items] == sorted(want)
    assert {i.source_id for i in items if isinstance(i, Rejected)} == {k for k, v in want.items() if not v}
    assert set(_reasons(items)) == {"no_caption"}
    by_id = {s.source_id: s for s in _ok(items)}
    assert by_id["odd.png"].caption == "caf\udce9"
    png, cap = stamps[0]
    s = by_id[png.relative_to(STAMPS).as_posix()]
    full = png.with_suffix(".txt").read_text("utf-8").strip()
    assert s.caption == full and "\n" in full and s.url == str(root / s.source_id) and s.image is None
    assert s.uid == src.uid(s.source_id) and set(REQUIRED_META) <= set(s.meta)
    first = list(Folder(FolderConfig(root=str(root), caption_first_line=True, limit=3)).items(tmp_path, 5))
    assert len(first) == 3 and first[0].caption == read_caption(png.with_suffix(".txt"))
    with pytest.raises(ValueError, match="caption_ext: '.txt' must be a file extension without the dot"):
        FolderConfig(caption_ext=".txt")


# --------------------------------------------------------------------------------------- webdataset

def _shard(path: Path, stamps: list[tuple[Path, str]], layout: str, start: int = 0) -> list[dict]:
    """A shard of real stamps, in our layout (png, uid in json) or img2dataset's (jpg, status json)."""
    metas = []
    with tarfile.open(path, "w") as tf:
        for i, (png, cap) in enumerate(stamps, start):
            with Image.open(png) as im:
                w, h = im.size
                if layout == "ours":
                    data, ext = png.read_bytes(), "png"
                    meta = {"uid": f"{i:032x}", "source": "tuxpaint", "width": w, "height": h,
                            "original_width": w, "original_height": h, "lang": "en"}
                else:
                    buf = io.BytesIO()
                    im.convert("RGB").resize((w // 2 or 1, h // 2 or 1)).save(buf, format="JPEG")
                    data, ext = buf.getvalue(), "jpg"
                    meta = {"url": f"https://example.org/{png.name}", "key": f"{i:09d}", "status": "success",
                            "caption": cap, "width": w // 2 or 1, "height": h // 2 or 1,
                            "original_width": w, "original_height": h, "error_message": None}
            key = f"{i:09d}"
            add_member(tf, f"{key}.{ext}", data)
            add_member(tf, f"{key}.txt", cap.encode())
            add_member(tf, f"{key}.json", json.dumps(meta).encode())
            metas.append(meta)
    return metas


def test_webdataset_reads_our_shards_and_img2dataset_shards(tmp_path, stamps):
    root = tmp_path / "shards"
    (root / "sub").mkdir(parents=True)
    ours = _shard(root / "00000.tar", stamps[:10], "ours")
    theirs = _shard(root / "sub/00001.tar", stamps[10:20], "img2dataset", start=10)
    (root / "sub/00001.parquet").write_bytes(b"img2dataset writes these beside the tar")

    src = WebDataset(WebDatasetConfig(root=str(root), recursive=True, keep_json=["status"]), name="old")
    assert src.plan(tmp_path, 3) == ["00000.tar", "sub/00001.tar"]
    a, b = (list(src.read(u, tmp_path)) for u in src.plan(tmp_path, 3))
    assert len(_ok(a)) == len(_ok(b)) == 10
    assert [s.uid for s in a] == [m["uid"] for m in ours]  # our own uids are kept
    assert a[0].image == stamps[0][0].read_bytes() and a[0].image_ext == "png"
    assert [s.caption for s in a + b] == [c for _, c in stamps[:20]]
    assert {k: a[3].meta[k] for k in REQUIRED_META} == {k: ours[3][k] for k in REQUIRED_META}
    s = b[2]
    assert s.source_id == "sub/00001.tar/000000012" and s.uid == src.uid("sub/00001.tar/000000012")
    assert s.image_ext == "jpg" and Image.open(io.BytesIO(s.image)).size == (theirs[2]["width"], theirs[2]["height"])
    assert s.meta["url"] == theirs[2]["url"] and s.meta["original_width"] == theirs[2]["original_width"]
    assert s.meta["status"] == "success" and s.meta["lang"] is None and "error_message" not in s.meta
    assert [x.uid for x in WebDataset(WebDatasetConfig(root=str(root), recursive=True), name="old").read("sub/00001.tar", tmp_path)] \
        == [x.uid for x in b]
    # one tar as root; limit cuts the plan across tars
    assert [len(list(src.read(u, tmp_path))) for u in src.plan(tmp_path, 3)] == [10, 10]
    lim = WebDataset(WebDatasetConfig(root=str(root), recursive=True, limit=13))
    assert lim.plan(tmp_path, 3) == ["00000.tar", "sub/00001.tar#first=3"]
    assert len(list(lim.items(tmp_path))) == 13
    assert len(list(WebDataset(WebDatasetConfig(root=str(root / "00000.tar"))).items(tmp_path))) == 10
    (tmp_path / "no_tars").mkdir()
    with pytest.raises(SourceError, match="no .tar files.*set recursive: true"):
        WebDataset(WebDatasetConfig(root=str(tmp_path / "no_tars")))


def test_webdataset_hostile_members_are_rejected_unread(tmp_path, stamps):
    marker = tmp_path / "PWNED"
    (png, cap), (png2, cap2) = stamps[0], stamps[1]
    img, img2 = png.read_bytes(), png2.read_bytes()
    limit = max(len(img), len(img2))
    members = [
        ("000.png", img, {}), ("000.txt", cap.encode(), {}),
        ("../escape.png", img, {}), ("../escape.txt", b"x", {}),
        ("/etc/abs.png", img, {}),
        ("link.png", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
        ("dev", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
        ("001.png", img, {}), ("001.txt", b"x", {}), ("001.pyd", pickle.dumps(Trap(marker)), {}),
        ("002.png", img + b"\0" * limit, {}), ("002.txt", b"x", {}),
        ("003.txt", b"caption only", {}),
        ("004.png", img, {}),
        ("005.png", img, {}), ("005.txt", b"x", {}), ("005.json", b"{not json", {}),
        ("000.png", img, {}), ("000.txt", b"again", {}),
        ("006.png", img2, {}), ("006.txt", cap2.encode(), {}),
    ]
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        for name, data, info in members:
            add_member(tf, name, data, **info)
    src = WebDataset(WebDatasetConfig(root=str(tmp_path / "evil.tar"), max_member_bytes=limit))
    items = list(src.items(tmp_path))
    assert not marker.exists()
    assert _reasons(items) == ["unsafe_path", "unsafe_path", "unsafe_member", "unsafe_member", "pickle_payload",
                               "member_too_large", "no_image", "no_caption", "bad_json", "duplicate_key"]
    assert [(s.source_id, s.caption) for s in _ok(items)] == [("evil.tar/000", cap), ("evil.tar/006", cap2)]
    assert len({i.uid for i in items}) == len(items)
    assert not (tmp_path.parent / "escape.png").exists() and not marker.exists()


def test_webdataset_truncated_and_corrupt_tars(tmp_path, stamps):
    full = tmp_path / "full.tar"
    _shard(full, stamps[:6], "ours")
    raw = full.read_bytes()
    with tarfile.open(full) as tf:
        members = tf.getmembers()
    png3 = next(m for m in members if m.name == "000000003.png")
    json4 = next(m for m in members if m.name == "000000004.json")
    cases = {
        "mid_member.tar": raw[: png3.offset_data + png3.size // 2],  # cut inside sample 3's image
        "no_end_marker.tar": raw[: json4.offset_data + ((json4.size + 511) // 512) * 512],  # whole samples, no zeros
        "bad_header.tar": raw[: png3.offset] + b"\xff" * 512 + raw[png3.offset + 512:],
        "empty.tar": b"",
    }
    want = {"mid_member.tar": 3, "no_end_marker.tar": 5, "bad_header.tar": 3, "empty.tar": 0}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        items = list(WebDataset(WebDatasetConfig(root=str(tmp_path / name))).items(tmp_path))
        assert [s.caption for s in _ok(items)] == [c for _, c in stamps[: want[name]]], name
        assert isinstance(items[-1], Rejected) and len(items) == want[name] + 1, name
        assert items[-1].reason.startswith(f"truncated_tar: {name} after {want[name]} samples"), items[-1].reason
    assert _reasons(list(WebDataset(WebDatasetConfig(root=str(full))).items(tmp_path))) == []
    with pytest.raises(ValueError, match="max_member_bytes: must be >= 1"):
        WebDatasetConfig(max_member_bytes=0)
