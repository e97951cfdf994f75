"""A small dataset built once per session from real Debian data: 300 Fashion-MNIST images and a
Tux Paint stamp folder the tests make (see :func:`tests.stamps.make_stamp_tree`)."""
from __future__ import annotations

import pytest

from data_prep.build import BuildResult, build_from_overrides
from tests.stamps import StampTree, make_stamp_tree

# 163 real stamps every default stage keeps + 7 planted rejections (4 without a caption, an
# elongated, a tiny and a damaged image): 170 Tux Paint inputs; 100 per shard gives several shards.
SMALL_PLAIN_STAMPS = 163
SMALL = [
    "sources.fashion_mnist.limit=300",
    "samples_per_shard=100",
    "tokenizer.vocab_size=500",
]


@pytest.fixture(scope="session")
def small_stamps(tmp_path_factory: pytest.TempPathFactory) -> StampTree:
    return make_stamp_tree(tmp_path_factory.mktemp("stamps"), SMALL_PLAIN_STAMPS)


@pytest.fixture(scope="session")
def small_overrides(small_stamps: StampTree) -> list[str]:
    return [*SMALL, f"sources.tuxpaint.root={small_stamps.root}"]


@pytest.fixture(scope="session")
def small_build(tmp_path_factory: pytest.TempPathFactory, small_overrides: list[str]) -> BuildResult:
    return build_from_overrides([f"out_dir={tmp_path_factory.mktemp('prep') / 'data'}", *small_overrides])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
