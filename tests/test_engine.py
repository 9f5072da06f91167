"""The distributed objective on a real LocalCluster against the in-memory objective."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sae import objective as obj
from sae.network import Network
from worker.chunks import cache_stats, clear_cache, kept_stats
from worker.dataset import ChunkError, write_dataset
from worker.engine import Cancelled, DistributedObjective, LocalObjective
from worker.memwatch import peak_rss, start_rss_sampler, stop_rss_sampler
from worker.tree import sequential_tree_sum, tree_levels


def _data(m: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((m, n))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, np.ndarray]:
    X = _data(1500, 36)
    path = tmp_path_factory.mktemp("ds") / "small"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=170, sample_shape=(6, 6))
    return str(path), X


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


NET = Network.autoencoder(36, 10, lam=1e-3, rho=0.05, beta=2.0)


@pytest.mark.bitwise
@pytest.mark.parametrize("passes", ["two", "fused"])
@pytest.mark.parametrize(("cache", "single"), [(False, False), (True, False), (True, None)])
def test_distributed_equals_in_memory(two_workers, small, passes, cache, single):
    path, X = small
    theta = NET.init_theta(1)
    f = DistributedObjective(
        two_workers, path, NET, passes=passes, cache=cache, job="eq", single_task=single
    )
    J, g = f(theta)
    J0, g0 = obj.cost(NET, theta, X)
    assert abs(J - J0) <= 1e-12 * abs(J0)
    assert _rel(g, g0) <= 1e-12
    # Same theta, same bits (and the cache, when on, served the second evaluation).
    J2, g2 = f(theta)
    assert J2 == J and np.array_equal(g2, g)
    assert f.n_evals == 2


def _malloc_env() -> dict:
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def test_workers_start_with_the_allocator_settings_of_the_kernels(two_workers):
    """Dask's MALLOC_TRIM_THRESHOLD_ alone makes every block temporary and every chunk read a
    fresh mmap (a 1.5x slower kernel in a worker, a 2x slower read): the embedded cluster's
    workers start with glibc's mmap threshold above a default chunk's size (worker.cluster)."""
    from worker.cluster import MALLOC_ENV

    envs = two_workers.run(_malloc_env)
    assert len(envs) == 2 and all(env == MALLOC_ENV for env in envs.values()), envs
    from worker.dataset import DEFAULT_CHUNK_BYTES

    assert int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) > DEFAULT_CHUNK_BYTES  # > a block too
    # the same settings for the workers of docker compose and of a cluster started by hand,
    # as Dask itself reads its configuration files
    import dask.config

    repo = Path(__file__).resolve().parents[1]
    conf = dask.config.collect(paths=[str(repo / "deploy")], env={})
    spawn = conf["distributed"]["nanny"]["pre-spawn-environ"]
    assert {k: str(v) for k, v in spawn.items()} == MALLOC_ENV


def test_tanh_linear_no_sparsity(two_workers, small):
    path, X = small
    net = Network.autoencoder(
        36, 7, lam=1e-4, rho=None, activation="tanh", output_activation="linear"
    )
    theta = net.init_theta(2)
    J, g = DistributedObjective(two_workers, path, net, job="nosparse", single_task=False)(theta)
    J0, g0 = obj.cost(net, theta, X)
    assert abs(J - J0) <= 1e-12 * abs(J0) and _rel(g, g0) <= 1e-12


def test_float32_close(two_workers, small):
    path, X = small
    theta = NET.init_theta(3)
    f = DistributedObjective(two_workers, path, NET, dtype="float32", single_task=False)
    J, g = f(theta)
    J0, g0 = obj.cost(NET, theta, X)
    assert abs(J - J0) <= 1e-5 * abs(J0)
    assert _rel(g, g0) <= 1e-4


@pytest.mark.parametrize("target", ["previous", "input"])
@pytest.mark.parametrize("passes", ["two", "fused"])
def test_frozen_encoder(two_workers, small, target, passes):
    path, X = small
    enc = Network(sizes=(36, 12), activations=("sigmoid",))
    enc_theta = enc.init_theta(4)
    H = obj.forward(enc, enc_theta, X)[-1]
    out = 36 if target == "input" else None
    net = Network.autoencoder(12, 5, lam=1e-3, rho=0.1, beta=1.0, output_size=out)
    theta = net.init_theta(5)
    f = DistributedObjective(
        two_workers, path, net, passes=passes, encoder=(enc, enc_theta), target=target, job="enc"
    )
    J, g = f(theta)
    J0, g0 = obj.cost(net, theta, H, Y=X if target == "input" else None)
    assert abs(J - J0) <= 1e-12 * abs(J0) and _rel(g, g0) <= 1e-12


def test_bad_shapes_are_refused(two_workers, small):
    path, _ = small
    with pytest.raises(ValueError, match="input size"):
        DistributedObjective(two_workers, path, Network.autoencoder(35, 4))
    f = DistributedObjective(two_workers, path, NET)
    with pytest.raises(ValueError, match="theta"):
        f(np.zeros(3))


def test_tree_shape_is_fixed():
    assert tree_levels(3, 8) == []
    assert tree_levels(9, 8) == [[(0, 8), (8, 9)]]
    parts = [{"count": np.float64(i), "x": np.full(3, 0.1 * i)} for i in range(20)]
    total = sequential_tree_sum(parts, 4)
    assert float(total["count"]) == sum(range(20))


@pytest.mark.bitwise
def test_bitwise_across_worker_counts_cache_and_local_twin(two_workers, small):
    from worker.cluster import get_client

    path, _ = small
    theta = NET.init_theta(6)
    results = []
    for passes in ("two", "fused"):
        ref = LocalObjective(path, NET, passes=passes)(theta)
        results.append((passes, "local", ref))
        for cache, single in ((False, False), (True, False), (True, True)):
            results.append(
                (
                    passes,
                    f"2w-cache{cache}",
                    DistributedObjective(
                        two_workers, path, NET, passes=passes, cache=cache, single_task=single
                    )(theta),
                )
            )
    with get_client(workers=1, memory_limit="1GB") as (c1, _):
        for passes in ("two", "fused"):
            for cache in (False, True):
                results.append(
                    (
                        passes,
                        f"1w-cache{cache}",
                        DistributedObjective(
                            c1, path, NET, passes=passes, cache=cache, single_task=False
                        )(theta),
                    )
                )
    for passes in ("two", "fused"):
        mine = [r for p, _, r in results if p == passes]
        J, g = mine[0]
        for J2, g2 in mine[1:]:
            assert J2 == J and np.array_equal(g2, g)


def test_cache_affinity_and_invalidation(two_workers, tmp_path):
    two_workers.run(clear_cache)
    X = _data(800, 16, seed=10)
    path = tmp_path / "cached"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100)
    net = Network.autoencoder(16, 4, lam=1e-3, rho=0.1, beta=1.0)
    theta = net.init_theta(0)
    f = DistributedObjective(
        two_workers, str(path), net, cache=True, job="cache", single_task=False
    )
    kept = sum(s["hits"] for s in two_workers.run(kept_stats).values())
    # what earlier tests' evaluations left (one stopped between its passes, say) stays until
    # the store needs the room
    left = sum(s["entries"] for s in two_workers.run(kept_stats).values())
    for _ in range(3):
        f(theta)
    stats = two_workers.run(cache_stats)
    # 8 chunks pinned 4 + 4: every chunk decoded once, then served from memory to pass 1;
    # pass 2 takes up the rows and activations pass 1 kept on the same worker
    assert sorted(s["misses"] for s in stats.values()) == [4, 4]
    assert sum(s["hits"] for s in stats.values()) == 8 * 3 - 8
    assert sum(s["hits"] for s in two_workers.run(kept_stats).values()) == kept + 8 * 3
    assert sum(s["entries"] for s in two_workers.run(kept_stats).values()) == left
    # Rewrite the dataset in place: a new objective must see the new values.
    X2 = X[::-1].copy()
    write_dataset(path, X2, *X2.shape, dtype="float64", chunk_rows=100, overwrite=True)
    f2 = DistributedObjective(two_workers, str(path), net, cache=True, job="cache")
    J, g = f2(theta)
    J0, g0 = obj.cost(net, theta, X2)
    assert abs(J - J0) <= 1e-12 * J0 and _rel(g, g0) <= 1e-12


@pytest.mark.bitwise
def test_worker_killed_mid_pass(two_workers, tmp_path):
    X = _data(12000, 64, seed=11)
    path = tmp_path / "kill"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=400)
    net = Network.autoencoder(64, 48, lam=1e-3, rho=0.05, beta=1.0)
    theta = net.init_theta(0)
    J0, g0 = LocalObjective(str(path), net)(theta)
    f = DistributedObjective(two_workers, str(path), net, cache=False, job="kill")
    pids = two_workers.run(os.getpid)
    victim = sorted(pids)[1]
    out: dict = {}

    def evaluate():
        out["r"] = f(theta)

    t = threading.Thread(target=evaluate)
    t.start()
    # Kill one worker once the first pass-1 results exist on the cluster.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        keys = two_workers.run_on_scheduler(
            lambda dask_scheduler: [
                str(k) for k, ts in dask_scheduler.tasks.items() if ts.state == "memory"
            ]
        )
        if any("pass1-kill" in k for k in keys):
            break
        time.sleep(0.01)
    done_before = sum(1 for k in keys if "pass1-kill" in k)
    os.kill(pids[victim], signal.SIGKILL)
    print(f"killed {victim} after {done_before} pass-1 results")
    t.join(120)
    J, g = out["r"]
    assert J == J0 and np.array_equal(g, g0)
    two_workers.wait_for_workers(2, timeout=60)


def _bad_dataset(tmp_path: Path, name: str) -> tuple[str, np.ndarray]:
    X = _data(600, 8, seed=12)
    path = tmp_path / name
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100)
    return str(path), X


def _chunk_file(path: str, i: int) -> Path:
    return Path(path) / "X" / "c" / str(i) / "0"


def test_missing_chunk_names_it(two_workers, tmp_path):
    path, _ = _bad_dataset(tmp_path, "missing")
    _chunk_file(path, 3).unlink()
    net = Network.autoencoder(8, 3, rho=0.1, beta=1.0)
    f = DistributedObjective(two_workers, path, net, job="missing", single_task=False)
    with pytest.raises(ChunkError, match="chunk 3 .*missing"):
        f(net.init_theta(0))


def test_corrupt_chunk_names_it(two_workers, tmp_path):
    path, _ = _bad_dataset(tmp_path, "corrupt")
    _chunk_file(path, 2).write_bytes(b"\x00garbage" * 7)
    net = Network.autoencoder(8, 3, rho=0.1, beta=1.0)
    f = DistributedObjective(two_workers, path, net, passes="fused", job="corrupt")
    with pytest.raises(ChunkError, match="chunk 2 "):
        f(net.init_theta(0))


def test_nan_chunk_names_it(two_workers, tmp_path):
    X = _data(600, 8, seed=13)
    X[450, 2] = np.nan
    path = tmp_path / "nan"
    write_dataset(path, X, *X.shape, dtype="float32", chunk_rows=100)
    net = Network.autoencoder(8, 3, rho=0.1, beta=1.0)
    f = DistributedObjective(two_workers, str(path), net, job="nan")
    with pytest.raises(ChunkError, match="chunk 4 .*NaN"):
        f(net.init_theta(0))


def test_should_stop_cancels_before_evaluating(two_workers, small):
    path, _ = small
    f = DistributedObjective(two_workers, path, NET, should_stop=lambda: True)
    with pytest.raises(Cancelled):
        f(NET.init_theta(0))
    assert f.n_evals == 0


def test_memory_bounded_out_of_core(tmp_path):
    """A dataset several times the workers' memory: one evaluation, no spilling, each
    worker's peak RSS under its limit."""
    from worker.cluster import get_client

    limit = 350 * 2**20
    m, n, rows = 180_000, 1024, 2000  # uint8: 184 MB stored, 1.47 GB as float64
    rng = np.random.default_rng(14)

    def blocks():
        for start in range(0, m, rows):
            yield rng.integers(0, 256, size=(min(rows, m - start), n), dtype=np.uint8)

    path = tmp_path / "big"
    write_dataset(path, blocks(), m, n, dtype="uint8", chunk_rows=rows, scale=1 / 255)
    net = Network.autoencoder(n, 4, lam=1e-4, rho=0.1, beta=1.0)
    theta = net.init_theta(0)
    with get_client(workers=2, memory_limit=limit) as (c, _):
        f = DistributedObjective(c, str(path), net, passes="two", dtype="float64", job="big")
        assert f.cache_bytes == 0  # 1.3 GB does not fit in 2 x 350 MB: out of core
        assert f._stage_nbytes() >= 2 * 2 * limit
        c.run(start_rss_sampler, 0.02)
        J, g = f(theta)
        peaks = c.run(stop_rss_sampler)
        spilled = c.run(lambda dask_worker: len(dask_worker.data.slow))
        assert np.isfinite(J) and np.all(np.isfinite(g))
        assert all(v == 0 for v in spilled.values())
        assert all(p < limit for p in peaks.values()), peaks
        print("peak RSS per worker (MB):", {k: v / 2**20 for k, v in peaks.items()})
        assert peak_rss() > 0


def test_large_graph_warning_silenced_per_submission_from_many_threads():
    """Two jobs' threads submitting at once leave the process's warning filters as they were
    (``catch_warnings`` alone would let the second restore the first's filter, for good), and
    the warning is silenced inside and shown outside."""
    import warnings

    from worker.engine import large_graph_expected

    before = list(warnings.filters)
    a_inside = threading.Event()

    def first():
        with large_graph_expected():
            a_inside.set()
            time.sleep(0.2)

    def second():
        a_inside.wait(5)
        with large_graph_expected():
            time.sleep(0.4)  # without the lock: entered while the first was inside, leaves last

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with large_graph_expected():
            warnings.warn("Sending large graph of size 300 MiB.", UserWarning, stacklevel=1)
        warnings.warn("Sending large graph of size 300 MiB.", UserWarning, stacklevel=1)
    assert len(seen) == 1
