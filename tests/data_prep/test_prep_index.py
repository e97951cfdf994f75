"""``index``: manifests for shards built elsewhere, equal to the builder's own for its shards."""
from __future__ import annotations

import shutil

import webdataset as wds

from data_prep.__main__ import main
from data_prep.index import index_shards
from data_prep.manifest import load_manifest


def test_index_reproduces_built_manifest(small_build):
    built = small_build.manifests["train"]
    assert index_shards(built.root, split="train").shards == built.shards


def test_index_cli_on_foreign_shards(tmp_path, capsys):
    # img2dataset-style keys and members, written by webdataset itself
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        for i in range(7):
            w.write({"__key__": f"{i:09d}", "jpg": b"\xff\xd8fake", "txt": f"caption {i}", "json": {"key": i}})
    assert main(["index", str(tmp_path)]) == 0
    m = load_manifest(tmp_path)
    assert [(s.name, s.samples) for s in m.shards] == [("00000.tar", 7)] and m.split == "train"
    assert main(["index", str(tmp_path)]) == 2  # refuses to replace a manifest
    assert "--force" in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--split", "heldout", "--force"]) == 0
    assert load_manifest(tmp_path).split == "heldout"


def test_index_cli_on_built_split(small_build, tmp_path):
    copy = tmp_path / "heldout"
    shutil.copytree(small_build.manifests["heldout"].root, copy)
    (copy / "manifest.json").unlink()
    assert main(["index", str(copy), "--split", "heldout"]) == 0
    assert load_manifest(copy).shards == small_build.manifests["heldout"].shards
