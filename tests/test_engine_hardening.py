"""Hardening of the engine and the training loop: bounded memory of the reduction, cancel
during an evaluation, stale metadata on remote stores, and friends."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest

from sae.network import Network
from worker.chunks import evaluate_chunks
from worker.engine import LocalObjective
from worker.tree import sequential_tree_sum, streaming_tree_sum, tree_levels

NET = Network.autoencoder(6, 3, lam=1e-4, rho=0.1, beta=3.0)


class _Leaf(dict):
    """A chunk's sums that can be counted while alive (a plain dict takes no weakref)."""


def _parts(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"count": np.float64(1), "W": rng.standard_normal(5) * 10.0 ** rng.integers(-8, 8)}
        for _ in range(n)
    ]


def _counted(parts: list[dict], alive: set, peak: list):
    """Yield copies of ``parts`` as :class:`_Leaf`, recording how many are alive at once."""
    for i, p in enumerate(parts):
        leaf = _Leaf(p)
        alive.add(i)
        weakref.finalize(leaf, alive.discard, i)
        peak[0] = max(peak[0], len(alive))
        yield leaf
        del leaf


@pytest.mark.bitwise
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 63, 64, 65, 100, 513])
@pytest.mark.parametrize("fan_in", [2, 3, 8])
def test_streaming_tree_sum_is_the_same_tree(n, fan_in):
    parts = _parts(n, n * 10 + fan_in)
    a = sequential_tree_sum(parts, fan_in)
    b = streaming_tree_sum(iter(parts), n, fan_in)
    assert a.keys() == b.keys()
    assert np.array_equal(a["W"], b["W"]) and a["count"] == b["count"] == n


@pytest.mark.parametrize("n,fan_in", [(513, 2), (513, 8), (1000, 3)])
def test_streaming_tree_sum_holds_few_sums(n, fan_in):
    alive: set = set()
    peak = [0]
    parts = _parts(n, 1)
    total = streaming_tree_sum(_counted(parts, alive, peak), n, fan_in)
    assert total["count"] == n
    depth = len(tree_levels(n, fan_in))
    # Leaves buffered at level 0 only: at most fan_in (+1 being pushed), never n.
    assert peak[0] <= fan_in + 1 < n
    assert depth >= 2
    # The old way (a list of every chunk's sums) holds all n at once.
    alive.clear()
    peak[0] = 0
    sequential_tree_sum(list(_counted(parts, alive, peak)), fan_in)
    assert peak[0] == n


def test_streaming_tree_sum_counts_its_parts():
    with pytest.raises(ValueError, match="expected 5"):
        streaming_tree_sum(iter(_parts(4, 0)), 5)
    with pytest.raises(ValueError, match="expected 3"):
        streaming_tree_sum(iter(_parts(4, 0)), 3)


@pytest.mark.bitwise
@pytest.mark.parametrize("passes", ["two", "fused"])
def test_evaluate_chunks_streaming_same_bits(passes):
    rng = np.random.default_rng(3)
    chunks = [(rng.random((7, 6)), None) for _ in range(20)]
    theta = NET.init_theta(2)
    m = sum(len(c[0]) for c in chunks)
    J0, g0 = evaluate_chunks(NET, theta, lambda: iter(chunks), passes, "float64", m, 3)
    J1, g1 = evaluate_chunks(
        NET, theta, lambda: iter(chunks), passes, "float64", m, 3, n_chunks=len(chunks)
    )
    assert J0 == J1 and np.array_equal(g0, g1)


def test_local_objective_memory_does_not_grow_with_chunks(tmp_path):
    """tracemalloc peak of one evaluation: chunk sums are not all kept (many small chunks
    of a wide network; the old list of sums would cost n_chunks x n_params x 8 bytes)."""
    import tracemalloc

    from worker.dataset import write_dataset

    net = Network.autoencoder(64, 64, lam=1e-4, rho=0.1, beta=3.0)
    X = np.random.default_rng(0).random((400, 64))
    path = tmp_path / "many"
    write_dataset(path, X, *X.shape, chunk_rows=2)  # 200 chunks
    f = LocalObjective(str(path), net)
    theta = net.init_theta(0)
    f(theta)
    tracemalloc.start()
    try:
        f(theta)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_sums = net.n_params * 8
    assert f.info.n_chunks == 200
    assert peak < 40 * per_sums < f.info.n_chunks * per_sums


# --------------------------------------------------------------------------- cancel


def _block_until(flag: str, limit: float) -> str:
    """Occupy a worker thread until ``flag`` exists (or ``limit`` seconds)."""
    import time
    from pathlib import Path

    t0 = time.monotonic()
    while not Path(flag).exists() and time.monotonic() - t0 < limit:
        time.sleep(0.05)
    return "released"


@pytest.fixture
def busy_workers(two_workers, tmp_path):
    """Both workers' only threads taken by another job's tasks (for up to 60 s)."""
    import time

    flag = tmp_path / "release"
    workers = sorted(two_workers.scheduler_info(n_workers=-1)["workers"])
    futs = [
        two_workers.submit(_block_until, str(flag), 60.0, workers=[w], pure=False) for w in workers
    ]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # both blockers running
        proc = two_workers.processing()
        if all(proc.get(w) for w in workers):
            break
        time.sleep(0.05)
    yield futs
    flag.touch()
    for f in futs:
        f.result(timeout=30)


@pytest.mark.parametrize("plan", ["local", "distributed"])
def test_cancel_while_workers_are_busy_returns(two_workers, busy_workers, tmp_path, plan):
    """A cancel while the job's tasks wait behind another job's: train returns (with
    the initial parameters, status cancelled) before the other job ends."""
    from worker.layout import load_model
    from worker.spec import TrainSpec
    from worker.train import train

    X = np.random.default_rng(0).random((300, 6))
    path = tmp_path / "d"
    from worker.dataset import write_dataset

    write_dataset(path, X, *X.shape, chunk_rows=100)
    spec = TrainSpec(dataset=str(path), hidden=3, max_iter=5, seed=1)
    calls = [0]

    def stop() -> bool:  # not before the first evaluation: cancel while it waits
        calls[0] += 1
        return calls[0] > 2

    r = train(spec, tmp_path / "job", client=two_workers, should_stop=stop, execution=plan)
    assert not any(f.done() for f in busy_workers)  # returned before the blockers ended
    assert r.status == "cancelled" and r.iterations == 0
    net, theta, _ = load_model(r.model_path)
    assert np.array_equal(theta, net.init_theta(1))


# --------------------------------------------------------------------------- stale metadata


def test_remote_rewrite_is_not_read_with_stale_metadata(tmp_path, monkeypatch):
    """A memory:// dataset rewritten with fewer rows by another process: a long-lived
    worker (whose array cache the writer cannot clear) reads the new version, and the
    engine's token changes although the group attributes are otherwise identical."""
    import worker.dataset as ds
    from worker.engine import dataset_token

    monkeypatch.setattr(ds._open_array, "cache_clear", lambda: None)  # the worker's cache
    url = f"memory://stale-{tmp_path.name}/d"
    A, B = np.ones((1000, 4)), np.full((950, 4), 2.0)
    ds.write_dataset(url, A, *A.shape, dtype="float64", chunk_rows=100)
    tok1 = dataset_token(url)
    assert dataset_token(url) == tok1  # stable while unchanged
    assert ds.read_chunk(url, 9).shape == (100, 4)
    ds.write_dataset(url, B, *B.shape, dtype="float64", chunk_rows=100, overwrite=True)
    assert ds.open_dataset(url).shape == (950, 4)
    assert dataset_token(url) != tok1
    c = ds.read_chunk(url, 9, scale=1.0)
    assert c.shape == (50, 4) and np.all(c == 2.0)
    np.testing.assert_array_equal(ds.read_all(url), B)
    ds._open_array_cached.cache_clear()


def test_remote_rewrite_seen_by_a_worker_process(two_workers, tmp_path):
    """The same in a real worker process, whose memory:// store and caches are its own."""

    def scenario(url: str):
        import numpy as np

        import worker.dataset as ds
        from worker.engine import dataset_token

        A, B = np.ones((1000, 4)), np.full((950, 4), 2.0)
        ds.write_dataset(url, A, *A.shape, dtype="float64", chunk_rows=100)
        tok = dataset_token(url)
        first = ds.read_chunk(url, 9).shape
        clear = ds._open_array.cache_clear
        ds._open_array.cache_clear = lambda: None  # as if another process rewrote it
        try:
            ds.write_dataset(url, B, *B.shape, dtype="float64", chunk_rows=100, overwrite=True)
        finally:
            ds._open_array.cache_clear = clear
        c = ds.read_chunk(url, 9, scale=1.0)
        return first, c.shape, float(c.min()), tok != dataset_token(url)

    url = f"memory://stale-w-{tmp_path.name}/d"
    first, shape, low, changed = two_workers.submit(scenario, url, pure=False).result()
    assert first == (100, 4) and shape == (50, 4) and low == 2.0 and changed


# --------------------------------------------------------------------------- CLI errors


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_dataset(tmp_path, rows=60, chunk_rows=20):
    from worker.dataset import write_dataset

    X = np.random.default_rng(0).random((rows, 6))
    path = tmp_path / "d"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=chunk_rows)
    return str(path), X


@pytest.mark.parametrize("command", ["train", "gradcheck"])
def test_cli_unreachable_scheduler_is_a_clean_message(tmp_path, monkeypatch, command):
    from click.testing import CliRunner

    import worker.cluster
    from service.cli import main

    monkeypatch.setattr(worker.cluster, "CONNECT_TIMEOUT", 1.0)
    path, _ = _small_dataset(tmp_path)
    address = f"tcp://127.0.0.1:{_free_port()}"
    args = [command, path, "--hidden", "3", "--scheduler", address]
    if command == "train":
        args += ["--out", str(tmp_path / "job")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert f"scheduler: cannot connect to {address}" in r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, OSError)


def test_cli_train_dataset_and_resume_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from service.cli import main

    path, _ = _small_dataset(tmp_path)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "job.json").write_text(json.dumps({"spec": {"dataset": path}}))
    r = CliRunner().invoke(main, ["train", path, "--resume", str(tmp_path / "job")])
    assert r.exit_code == 2 and "not both" in r.output, r.output


@pytest.mark.parametrize("command", ["encode", "reconstruct"])
def test_cli_encode_reconstruct_corrupt_chunk_names_it(tmp_path, command):
    from click.testing import CliRunner

    from sae.network import Network
    from service.cli import main
    from worker.layout import save_model

    path, _ = _small_dataset(tmp_path)
    (tmp_path / "d" / "X" / "c" / "1" / "0").write_bytes(b"not a chunk")
    net = Network.autoencoder(6, 3)
    save_model(tmp_path / "model.npz", net, net.init_theta(0))
    out = tmp_path / "out.npy"
    r = CliRunner().invoke(main, [command, str(tmp_path / "model.npz"), path, str(out), "-q"])
    assert r.exit_code == 1, r.output
    assert "chunk 1 of" in r.output and "Traceback" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_datasets_info_on_a_group_whose_x_is_a_group(tmp_path):
    import zarr
    from click.testing import CliRunner

    from service.cli import main
    from worker.dataset import DatasetError, open_dataset

    g = zarr.open_group(str(tmp_path / "g"), mode="w")
    g.create_group("X")
    g.attrs.update({"sae_dataset": 1, "complete": True})
    with pytest.raises(DatasetError, match="X is not an array"):
        open_dataset(tmp_path / "g")
    r = CliRunner().invoke(main, ["datasets", "info", str(tmp_path / "g")])
    assert r.exit_code == 1 and "not an array" in r.output, r.output


# --------------------------------------------------------------------------- fresh job race


def test_local_stage_fresh_run_ignores_a_left_over_state(tmp_path):
    """A fresh local-plan task starts from theta0 even if an older run left a state.npz
    (it appeared after train() cleared the folder); a rerun of the same task (its start
    marker exists) resumes."""
    from sae.optimize import OptimizerState
    from worker.execution import run_local_stage
    from worker.layout import OWNER, STARTED_PREFIX
    from worker.stage import Stage

    path, _ = _small_dataset(tmp_path, rows=90, chunk_rows=30)
    net = Network.autoencoder(6, 3, lam=1e-4, rho=0.1, beta=3.0)
    kw = dict(max_iter=6, execution="local", pictures=False)

    def run(out, theta0, owner, resume):
        out.mkdir(exist_ok=True)
        (out / OWNER).write_text(owner)
        stage = Stage.of(net, theta0, out, **kw)
        return run_local_stage(stage, path, owner=owner, resume=resume)

    ref = run(tmp_path / "ref", net.init_theta(1), "a", False)
    # An older run (other initial parameters) left its checkpoint in the folder.
    out = tmp_path / "job"
    run(out, net.init_theta(2), "old", False)
    old_state = OptimizerState.load(out / "state.npz")
    assert not np.array_equal(old_state.theta, ref.theta)
    fresh = run(out, net.init_theta(1), "new", False)
    assert np.array_equal(fresh.theta, ref.theta) and fresh.iterations == 6
    assert not list(out.glob(STARTED_PREFIX + "*"))  # removed when the task finishes
    # A rerun: the marker of this owner exists, so it continues the checkpoint.
    kw["max_iter"] = 8
    (out / f"{STARTED_PREFIX}again").touch()
    rerun = run(out, net.init_theta(2), "again", False)
    assert rerun.iterations == 8
    cont = run(tmp_path / "ref", net.init_theta(1), "a", True)  # resume as asked
    assert np.array_equal(rerun.theta, cont.theta)
