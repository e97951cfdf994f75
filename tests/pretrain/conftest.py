"""Fixtures shared by the training tests: the small build served by a real S3-API server."""
from __future__ import annotations

import pytest

from tests.pretrain.stores import S3_ROOT, S3Store


@pytest.fixture(scope="session")
def s3(small_build):
    """A moto S3 server on 127.0.0.1 holding the small build's train and heldout splits and its
    tokenizer under ``S3_ROOT``; its ``env`` reaches it (endpoint and credentials)."""
    store = S3Store()
    for split in ("train", "heldout"):
        store.put_tree(small_build.out_dir / split, f"{S3_ROOT}/{split}")
    store.filesystem().put_file(str(small_build.tokenizer_path), f"{S3_ROOT}/tokenizer.model")
    yield store
    store.close()
