"""Shared fixtures: a real Dask LocalCluster (processes) for the whole test session."""

from __future__ import annotations

import os

import pytest

# BLAS on one thread in the test process too: the in-process twin of the engine
# (worker.engine.LocalObjective) then gives the workers' bits.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


@pytest.fixture(scope="session")
def dask_client():
    """A client on an embedded LocalCluster: 2 worker processes x 1 thread, 1 GB each."""
    from worker.cluster import get_client

    with get_client(workers=2, threads_per_worker=1, memory_limit="1GB", dashboard=False) as (
        client,
        _,
    ):
        yield client


@pytest.fixture
def two_workers(dask_client):
    """The session client, after making sure both workers are up (a test may kill one)."""
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client
