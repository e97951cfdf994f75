"""A small dataset built once per session from the real Debian data (Fashion-MNIST + Tux Paint)."""
from __future__ import annotations

import pytest

from data_prep.build import BuildResult, build_from_overrides

# 300 Fashion-MNIST images + the first 170 Tux Paint stamps (animals/ and cartoon/, which include
# an over-elongated fish and six variants without captions); 100 per shard gives several shards.
SMALL = [
    "sources.fashion_mnist.limit=300",
    "sources.tuxpaint.limit=170",
    "samples_per_shard=100",
    "tokenizer.vocab_size=500",
]


@pytest.fixture(scope="session")
def small_overrides() -> list[str]:
    return list(SMALL)


@pytest.fixture(scope="session")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return build_from_overrides([f"out_dir={tmp_path_factory.mktemp('prep') / 'data'}", *SMALL])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
