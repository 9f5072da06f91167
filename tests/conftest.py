"""Shared fixtures: a real Dask LocalCluster (processes) for the whole test session."""

from __future__ import annotations

import pytest

# No OPENBLAS_NUM_THREADS here: the engine sets one BLAS thread itself wherever it computes
# (worker.threads), so the test process keeps the BLAS threads it started with, as a user's does.


@pytest.fixture(scope="session")
def dask_client():
    """A client on an embedded LocalCluster: 2 worker processes x 1 thread, 1 GB each."""
    from worker.cluster import get_client

    with get_client(workers=2, threads_per_worker=1, memory_limit="1GB") as (
        client,
        _,
    ):
        yield client


@pytest.fixture
def two_workers(dask_client):
    """The session client, after making sure both workers are up (a test may kill one)."""
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client
