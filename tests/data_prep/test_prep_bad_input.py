"""Bad input through a whole build: every kind is counted under its own reason in the decisions and
the report, nothing crashes, nothing is unpickled, nothing is written outside the output folder."""
from __future__ import annotations

import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.build import build_from_overrides
from data_prep.sources import SourceError
from tests import stamps as stamps_on_disk
from tests.data_prep.hostile import Trap, add_member



def real_stamps(n: int) -> list[tuple[Path, str]]:
    """(png, caption) of the first ``n`` plain stamps: only the damage done here gets them rejected."""
    return [(s.path, s.caption) for s in stamps_on_disk.plain(n)]


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    marker = root / "UNPICKLED"
    stamps = real_stamps(8)
    img = stamps[0][0].read_bytes()
    shards = root / "shards"
    shards.mkdir()
    with tarfile.open(shards / "evil.tar", "w") as tf:
        for name, data, info in [
            ("a.png", img, {}), ("a.txt", stamps[0][1].encode(), {}),  # one good sample
            ("../escape.png", img, {}), ("../escape.txt", b"x", {}),
            ("/etc/abs.png", img, {}),
            ("link.png", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
            ("b.png", img, {}), ("b.txt", b"a bird", {}), ("b.pyd", pickle.dumps(Trap(marker)), {}),
        ]:
            add_member(tf, name, data, **info)
    with tarfile.open(shards / "cut.tar", "w") as tf:
        for i, (png, cap) in enumerate(stamps[1:5]):
            add_member(tf, f"{i:03d}.png", png.read_bytes())
            add_member(tf, f"{i:03d}.txt", cap.encode())
    raw = (shards / "cut.tar").read_bytes()
    # Cut inside the first image (after its 512-byte header), whatever the stamps' sizes: no whole sample.
    (shards / "cut.tar").write_bytes(raw[: 512 + len(stamps[1][0].read_bytes()) // 2])
    folder = root / "folder"
    folder.mkdir()
    for png, cap in stamps[5:8]:
        shutil.copy(png, folder / png.name)
        (folder / png.with_suffix(".txt").name).write_text(cap)
    (folder / "corrupt.png").write_bytes(img[: len(img) // 3])
    (folder / "corrupt.txt").write_text("a broken bird")
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("an empty file")
    shutil.copy(stamps[0][0], folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    shutil.copy(stamps[0][0], folder / "blank.png")
    (folder / "blank.txt").write_text("   \n")
    shutil.copy(stamps[0][0], folder / "nocaption.png")
    out = root / "out"
    before = sorted(p for p in root.rglob("*") if not p.is_relative_to(out))
    result = build_from_overrides([
        f"out_dir={out}", "~sources.fashion_mnist", "~sources.tuxpaint",
        "+sources.shards.type=webdataset", f"+sources.shards.root={shards}",
        "+sources.pics.type=folder", f"+sources.pics.root={folder}",
        "tokenizer.vocab_size=60", "workers.processes=1"])
    after = sorted(p for p in root.rglob("*") if not p.is_relative_to(out))
    return {"result": result, "marker": marker, "new_files": set(after) - set(before)}


def test_each_bad_input_has_its_own_reason(bad_build):
    rows = pq.read_table(bad_build["result"].decisions_path).to_pylist()
    reasons = Counter(r["reason"].split(":")[0] for r in rows if not r["kept"])
    assert reasons == {"unsafe_path": 2, "unsafe_member": 1, "pickle_payload": 1, "truncated_tar": 1,
                       "decode_error": 1, "empty_file": 1, "caption_not_utf8": 1, "empty_caption": 1,
                       "no_caption": 1}, reasons
    kept = [r for r in rows if r["kept"]]
    assert sorted(r["source_id"] for r in kept if r["source"] == "shards") == ["evil.tar/a"]
    assert len([r for r in kept if r["source"] == "pics"]) == 3
    report = bad_build["result"].report_path.read_text()
    for code in reasons:
        assert code in report


def test_nothing_unpickled_nothing_written_outside(bad_build):
    assert not bad_build["marker"].exists()
    assert bad_build["new_files"] == set()


def test_missing_column_fails_naming_it(tmp_path):
    (tmp_path / "pairs.csv").write_text("link,text\n/x.png,a bird\n")
    with pytest.raises(SourceError, match=r"no column 'url' \(option url_col\).*link.*text"):
        build_from_overrides([f"out_dir={tmp_path / 'out'}", "~sources.fashion_mnist", "~sources.tuxpaint",
                              "+sources.t.type=table", f"+sources.t.root={tmp_path / 'pairs.csv'}"])
