"""Training data from object storage and HTTP (data_prep/storage.py): a real S3-API server (moto's
server mode) and a real HTTP server on 127.0.0.1 serve a dataset built by data_prep. The loader reads
the same batches as from local disk and resumes exactly; a vanished shard or a connection cut
mid-shard is retried, then skipped and counted, never a hang; planning an epoch over a 100k-shard
manifest makes no request per shard; bad stores fail in one line. Training from S3 (and that no
credential shows) is in test_train_distributed.py's resume test."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import s3fs

from data_prep.manifest import MANIFEST_NAME, load_manifest
from launch.config import compose_train_config
from pretrain.config import ConfigError, DataConfig
from pretrain.data import TrainLoader, Tokenizer
from pretrain.data.check import check_inputs
from pretrain.data.stream import ShardStream, plan_shards
from pretrain.data.transforms import image_transform
from tests.pretrain.stores import S3_ROOT, SECRET, HttpStore, S3Store

IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 8


@pytest.fixture
def s3_env(s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture
def http(small_build, tmp_path: Path):
    """The small build's train split and tokenizer, copied so a test may damage them, over HTTP."""
    import shutil

    shutil.copytree(small_build.out_dir / "train", tmp_path / "data" / "train")
    shutil.copy(small_build.tokenizer_path, tmp_path / "data" / "tokenizer.model")
    store = HttpStore(tmp_path / "data")
    yield store
    store.close()


def make_loader(root: str, workers: int = 1, train: str | None = None, tokenizer: str | None = None) -> TrainLoader:
    cfg = DataConfig(root=root, train=train or f"{root}/train", tokenizer=tokenizer or f"{root}/tokenizer.model",
                     batch_size=BATCH, num_workers=workers, shuffle_buffer=50)
    return TrainLoader(cfg, IMAGE_SIZE, Tokenizer(cfg.tokenizer, CONTEXT), rank=0, world_size=1)


def take(loader: TrainLoader, n: int) -> list[list[str]]:
    return [loader.next()["uids"] for _ in range(n)]


def test_s3_and_http_give_the_local_batches_and_resume_exactly(small_build, s3_env, http, caplog) -> None:
    local = make_loader(str(small_build.out_dir))
    expected = take(local, 12)
    local.close()
    for root in (S3_ROOT, http.url):
        first = make_loader(root)
        head = take(first, 5)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = make_loader(root)
        resumed.load_state_dict(state)
        assert head + take(resumed, 7) == expected, root
        assert resumed.corrupt == 0
        resumed.close()
    assert "does not match" not in caplog.text, "the resumes seek through the sample indexes (HTTP: by reading on)"


def test_pipe_commands_give_the_local_batches(small_build) -> None:
    """webdataset's ``pipe:`` convention: a command template writing each file to stdout."""
    local = make_loader(str(small_build.out_dir), workers=0)
    piped = make_loader(str(small_build.out_dir), workers=0, train=f"pipe:cat {small_build.out_dir}/train/{{}}")
    assert take(piped, 6) == take(local, 6) and piped.corrupt == 0


def test_a_shard_that_vanished_is_named_skipped_and_counted(small_build, s3_env, http, caplog) -> None:
    manifest = load_manifest(small_build.out_dir / "train")
    gone = manifest.shards[1].name
    prefix = f"{S3_ROOT}-vanished"
    s3_env.put_tree(small_build.out_dir / "train", f"{prefix}/train")
    s3_env.filesystem().put_file(str(small_build.tokenizer_path), f"{prefix}/tokenizer.model")
    s3_env.filesystem().rm(f"{prefix}/train/{gone}")
    (http.root / "train" / gone).unlink()
    per_epoch = manifest.total_samples // BATCH
    with caplog.at_level(logging.WARNING):
        # S3 lists the folder at start: the shard is left out of the plan before anything is read.
        listed = make_loader(prefix, workers=0)
        take(listed, per_epoch)
        assert f"{prefix}/train/{gone} is listed in the manifest but missing" in caplog.text
        assert listed.corrupt == 0 and listed.plan.problems
        # HTTP cannot list: the shard's range is found missing when read, skipped and counted.
        served = make_loader(http.url, workers=0)
        take(served, per_epoch)
        assert served.corrupt >= manifest.shards[1].samples - BATCH
        assert f"{http.url}/train/{gone}" in caplog.text and "does not exist" in caplog.text


def test_a_connection_cut_mid_shard_is_retried_then_skipped(small_build, http, caplog) -> None:
    manifest = load_manifest(small_build.out_dir / "train")
    shard = manifest.shards[0]
    local = make_loader(str(small_build.out_dir), workers=0)
    expected = take(local, 10)
    with caplog.at_level(logging.WARNING):
        http.cut(f"train/{shard.name}", after=shard.bytes // 2, times=1)  # one cut: the retry reads it all
        once = make_loader(http.url, workers=0)
        assert take(once, 10) == expected and once.corrupt == 0
        assert http.hits[f"train/{shard.name}"] >= 2 and "retry 1 of 2" in caplog.text
        t0 = time.monotonic()
        http.cut(f"train/{shard.name}", after=shard.bytes // 2, times=1000)  # every read cut: skipped, counted
        always = make_loader(http.url, workers=0)
        take(always, manifest.total_samples // BATCH)
        assert always.corrupt > 0 and "truncated or unreadable" in caplog.text
        assert time.monotonic() - t0 < 120, "a cut connection must not stall the loader"


def test_planning_an_epoch_of_100k_shards_makes_no_request_per_shard(small_build, tmp_path: Path) -> None:
    """A synthetic 100k-shard manifest (the shards need not exist: planning must not touch them)."""
    folder = tmp_path / "big" / "train"
    folder.mkdir(parents=True)
    shards = [{"name": f"shard-{i:06d}.tar", "samples": 5000, "bytes": 250_000_000, "sha256": "0" * 64}
              for i in range(100_000)]
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "webdataset", "version": 1, "split": "train",
                                                    "shards": shards, "config": {}}))
    store = HttpStore(tmp_path / "big")
    try:
        t0 = time.perf_counter()
        manifest = load_manifest(f"{store.url}/train")
        plan = plan_shards(manifest)
        stream = ShardStream(manifest, Tokenizer(small_build.tokenizer_path, CONTEXT), image_transform(IMAGE_SIZE),
                             BATCH, rank=1000, world_size=1024, workers=4, seed=0, shuffle_buffer=2000, plan=plan)
        ranges = stream.plan_epoch(consumer=4001, epoch=3)  # this rank's slices of the epoch: arithmetic, no read
        seconds = time.perf_counter() - t0
    finally:
        store.close()
    print(f"planning an epoch of 100,000 shards: {seconds:.2f} s, requests {dict(store.hits)}")
    assert sum(stop - start for _, start, stop in ranges) == 100_000 * 5000 // 4096
    assert dict(store.hits) == {f"train/{MANIFEST_NAME}": 1}, "one request: the manifest"
    assert seconds < 2.0


@pytest.mark.parametrize("case,expected", [
    ("missing_bucket", ["s3://no-such-bucket", "does not exist"]),
    ("no_credentials", ["no credentials found", "AWS_ACCESS_KEY_ID"]),
    ("forbidden", ["access denied (403)"]),
    ("unreachable", ["http://127.0.0.1:9/", "cannot reach"]),
])
def test_a_bad_store_is_one_clear_line_before_training(case: str, expected: list[str], s3_env, http,
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = {"missing_bucket": "s3://no-such-bucket/data", "no_credentials": S3_ROOT, "forbidden": http.url,
            "unreachable": "http://127.0.0.1:9/data"}[case]
    if case == "no_credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the earlier credentials
    if case == "forbidden":
        http.forbidden.add(f"train/{MANIFEST_NAME}")
    cfg = compose_train_config([f"data.root={root}", "eval.retrieval=[]", "eval.zeroshot=[]"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    message = str(e.value)
    assert "\n" not in message and SECRET not in message
    for fragment in expected:
        assert fragment in message, message
    assert time.monotonic() - t0 < 60
