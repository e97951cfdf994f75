"""Fixtures for the launcher tests: one real Slurm cluster shared by the whole session."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.launch.slurm_cluster import SlurmCluster, slurm_cluster_session


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started single-node Slurm cluster (skipped without root/packages; a failure under CI=true)."""
    yield from slurm_cluster_session()
