"""Finding or making a Dask cluster: an embedded LocalCluster or an existing scheduler.

Nothing here runs at import time; :func:`get_client` is a context manager::

    with get_client(workers=2) as (client, cluster):
        print(client.dashboard_link)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: Environment of worker processes: BLAS uses exactly the threads Dask gives it per task.
BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Seconds to wait for a running scheduler (an address that does not answer fails then).
CONNECT_TIMEOUT = 10.0
#: Seconds a client keeps reconnecting to a scheduler that went away (a restart) before it
#: closes itself; evaluations lost with the scheduler are sent again once it is back.
RECONNECT_TIMEOUT = 120.0


#: glibc's allocator settings for worker processes, set before they start. Dask's default
#: (``MALLOC_TRIM_THRESHOLD_=65536`` in ``distributed.nanny.pre-spawn-environ``) also turns off
#: glibc's adaptive mmap threshold, so every array above 128 kB was a fresh mmap whose pages
#: fault in again: a 5,000-row 784-196 float32 fused pass took 184-193 ms in a worker against
#: 122 ms in a plain process, and reading a 16 MB chunk 22 ms against 10 ms
#: (``benchmarks/bench_engine.py``). Arrays up to 32 MiB (blocks' temporaries, and a chunk of
#: the default ~16 MB with the bytes it is decoded from) now come from the heap, which keeps up
#: to 64 MiB free at its top and hands the rest back to the system.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}


class SchedulerUnreachable(ConnectionError):
    """No scheduler answered at the given address; the message names it."""


def worker_env(blas_threads: int = 1) -> dict[str, str]:
    """Environment variables pinning BLAS threads in worker processes."""
    return {k: str(blas_threads) for k in BLAS_ENV_VARS}


@contextlib.contextmanager
def get_client(
    scheduler: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    quiet: bool = True,
    connect_timeout: float | None = None,
    dashboard_host: str = "127.0.0.1",
) -> Iterator[tuple[object, object | None]]:
    """A Dask client on an embedded LocalCluster or on an existing scheduler.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); default: start an embedded
        ``LocalCluster(processes=True)``.
    workers : int
        Worker processes of the embedded cluster.
    threads_per_worker : int
        Threads of each worker; every task runs BLAS on one thread.
    memory_limit : str or int or None
        Memory limit of each embedded worker (``"auto"``, ``"700MB"``, bytes, None/0 for none).
    quiet : bool
        Silence the cluster's informational logging.
    connect_timeout : float, optional
        Seconds to wait for ``scheduler`` (default :data:`CONNECT_TIMEOUT`).
    dashboard_host : str
        Interface of an embedded cluster's dashboard: loopback by default (it shows job
        names, dataset paths and tracebacks, without authentication); ``"0.0.0.0"`` serves it
        on every interface.

    Yields
    ------
    (client, cluster)
        ``cluster`` is the LocalCluster, or None when connected to ``scheduler``. An
        embedded cluster serves its dashboard on a free port (``client.dashboard_link``).

    Raises
    ------
    SchedulerUnreachable
        If no scheduler answers at ``scheduler`` within ``connect_timeout`` seconds.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"scheduler: cannot connect to {scheduler} within {timeout:g} s ({exc})"
            ) from None
        # Dask reuses the connect timeout as the window to reconnect in (no option for it).
        client._timeout = max(timeout, RECONNECT_TIMEOUT)
        try:
            yield client, None
        finally:
            client.close(timeout=2 * timeout)  # as before the longer reconnect window
        return
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers and threads_per_worker must be >= 1")
    kwargs: dict = {}
    if quiet:
        import logging

        kwargs["silence_logs"] = logging.WARNING
    import os

    import dask

    spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC_ENV.items()}
    # Dask lets this process's environment override the config (a notebook that started a
    # plain LocalCluster before holds Dask's MALLOC_TRIM_THRESHOLD_ there), and its Nanny
    # writes the values into this environment anyway when it spawns
    os.environ.update(MALLOC_ENV)
    with dask.config.set(spawn):  # read by each Nanny when it is made, used at every restart
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit if memory_limit not in (None, "none") else 0,
            dashboard_address=f"{dashboard_host}:0",
            env=worker_env(1),
            **kwargs,
        )
    try:
        client = Client(cluster)
        try:
            yield client, cluster
        finally:
            client.close()
    finally:
        cluster.close()


def dashboard_link(client) -> str | None:
    """The client's dashboard URL, or None when the scheduler serves none."""
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard configured
        return None
