"""Nothing in a shard is ever unpickled or handed to an exotic decoder by the training loader.

webdataset's default decoders unpickle ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth``
ones; a shard is data from outside, so the trainer's reader must never do either. The payloads
here are real pickles whose unpickling creates a trap file; the test first proves the trap works.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

from data_prep.manifest import Manifest
from pretrain.config import DataConfig
from pretrain.data import TrainLoader, Tokenizer, image_transform
from pretrain.data.shard_samples import parse_sample, read_tar
from tests.chaos.tar_kit import add_shard, real_samples, sample_members, tar_bytes

PICKLE_KEYS = ("pyd", "pickle", "pkl", "pth", "pt")
IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 4


class Trap:
    """Unpickling this calls ``open(path, "w")``: the file appearing means something unpickled data."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def payloads(trap: Path) -> dict[str, bytes]:
    torch_bytes = io.BytesIO()
    torch.save({"weights": Trap(trap)}, torch_bytes)  # what a hostile .pth would hold
    return {ext: torch_bytes.getvalue() if ext in ("pth", "pt") else pickle.dumps(Trap(trap)) for ext in PICKLE_KEYS}


def hostile_shard(samples: list[dict], trap: Path) -> tuple[bytes, set[str], int]:
    """(tar, uids of the samples that must still train, number of samples that must be skipped)."""
    bombs = payloads(trap)
    members: list[tuple[str, bytes]] = []
    keep: set[str] = set()
    for s in samples[:-3]:  # intact samples carrying every pickle key besides their own data
        members += sample_members(s) + [(f"{s['__key__']}.{ext}", data) for ext, data in bombs.items()]
        keep.add(json.loads(s["json"])["uid"])
    a, b, c = samples[-3:]
    members += [(f"{a['__key__']}.pyd", bombs["pyd"])]  # a pickle and nothing else
    members += sample_members({**b, "json": bombs["pickle"]})  # the metadata is a pickle
    members += sample_members({k: v for k, v in c.items() if k != "png"} | {"jpg": bombs["pickle"]})  # so is the "image"
    return tar_bytes(members), keep, 3


@pytest.fixture()
def trap(tmp_path: Path) -> Path:
    """A trap path, after proving that unpickling the payloads really springs it."""
    path = tmp_path / "TRAP-unpickled"
    for ext, data in payloads(path).items():
        torch.load(io.BytesIO(data), weights_only=False) if ext in ("pth", "pt") else pickle.loads(data)
        assert path.exists(), f"the .{ext} payload does not spring the trap: the test would prove nothing"
        path.unlink()
    return path


def test_pickle_members_are_never_unpickled_through_the_trainers_loader(small_build, tmp_path, trap) -> None:
    samples = real_samples(small_build.manifests["train"], 11)
    data, keep, bad = hostile_shard(samples, trap)
    manifest = Manifest(shards=[], root=tmp_path / "hostile")
    manifest.root.mkdir()
    add_shard(manifest, "shard-000000.tar", data, samples=len(samples))
    tokenizer = Tokenizer(small_build.tokenizer_path, CONTEXT)
    cfg = DataConfig(root=str(manifest.root), train=str(manifest.root), tokenizer=tokenizer.model_path,
                     batch_size=BATCH, num_workers=0, shuffle_buffer=0)
    loader = TrainLoader(cfg, IMAGE_SIZE, tokenizer, rank=0, world_size=1)
    epochs = 3
    uids = [u for _ in range(epochs * len(keep) // BATCH) for u in loader.next()["uids"]]
    assert not trap.exists(), "a shard member was unpickled"
    assert set(uids) == keep, "samples carrying extra pickle members still train (those members are ignored)"
    assert loader.corrupt >= (epochs - 1) * bad, "samples whose image/json is a pickle are skipped and counted"


def test_pickle_members_are_not_even_read(small_build, tmp_path, trap) -> None:
    data, _, _ = hostile_shard(real_samples(small_build.manifests["train"], 4), trap)
    (tmp_path / "s.tar").write_bytes(data)
    raws = list(read_tar(str(tmp_path / "s.tar"), 0, 4, pytest.fail))
    read = [sorted(k for k in r if not k.startswith("__")) for r in raws]
    # Pickle-keyed members are skipped unread; a pickle under a read key is bytes that fail to parse.
    assert read == [["json", "png", "txt"], [], ["json", "png", "txt"], ["jpg", "json", "txt"]]
    assert not trap.exists()


def test_an_eps_disguised_as_jpg_never_reaches_ghostscript(small_build) -> None:
    """PIL would run Ghostscript on EPS bytes, whatever the member's extension; only JPEG, PNG
    and WebP parsers may see shard bytes."""
    sample = real_samples(small_build.manifests["train"], 1)[0]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    raw = {k: v for k, v in sample.items() if k != "png"} | {"jpg": eps}
    with mock.patch.object(subprocess, "check_call", side_effect=AssertionError("a subprocess was started")) as spawn, \
         mock.patch.object(subprocess, "Popen", side_effect=AssertionError("a subprocess was started")):
        with pytest.raises(ValueError, match="image is corrupt: UnidentifiedImageError"):
            parse_sample(raw, image_transform(IMAGE_SIZE))
    assert not spawn.called
