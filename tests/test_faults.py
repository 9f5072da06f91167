"""Faults (issue 11): workers killed at random, for memory, after a job; a scheduler restart
under ``sae serve --scheduler``. Every job that survives ends with bitwise the model of an
uninterrupted run; a finished job is never run again; a job its workers cannot run says why.

Each test that kills processes runs on a cluster of its own (2 workers x 1 thread), so the
session's cluster never waits for a nanny to bring a worker back.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from tests.service_fixtures import Server, child_env, free_port, wait_job, write_tiny
from tests.service_fixtures import load_model as load_arrays
from worker.dataset import write_dataset
from worker.layout import OWNER, load_model, read_history
from worker.spec import TrainSpec
from worker.train import train

#: The distributed plan with one task per chunk (this small data would be one task).
PER_CHUNK = {"single_task": False}


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> str:
    """1,200 rows of 36 features in (0.1, 0.9), 8 chunks of 150, 6 x 6 pictures."""
    X = np.random.default_rng(0).random((1200, 36)) * 0.8 + 0.1
    path = tmp_path_factory.mktemp("faults") / "patches"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=150, sample_shape=(6, 6))
    return str(path)


def _spec(path: str, **kw) -> TrainSpec:
    base = dict(dataset=path, hidden=9, lam=1e-4, rho=0.05, beta=3.0, max_iter=12, seed=3)
    return TrainSpec(**{**base, **kw})


def _theta(out: Path) -> np.ndarray:
    return load_model(out / "model.npz")[1]


@contextlib.contextmanager
def _cluster(**kw) -> Iterator:
    """A LocalCluster of this test's own: 2 worker processes x 1 thread, 1 GB each."""
    from worker.cluster import get_client

    with get_client(**{"workers": 2, "threads_per_worker": 1, "memory_limit": "1GB", **kw}) as (
        client,
        _,
    ):
        yield client


def _until(condition: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll ``condition()`` until it is true; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(every)


def _pids(client) -> dict[str, int]:
    """Address -> pid of the workers answering now."""
    return client.run(os.getpid, on_error="ignore")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _back(client, killed: set[str], n: int = 2, timeout: float = 60.0) -> dict[str, int]:
    """Wait until ``n`` workers answer, none of them a killed one; their pids."""

    def ready():
        pids = _pids(client)
        return pids if len(pids) >= n and not set(pids) & killed else None

    return _until(ready, timeout, f"{n} workers back after killing {sorted(killed)}", 0.2)


def _tasks(client) -> dict[str, str]:
    """Key -> state of every task the scheduler knows."""
    return client.run_on_scheduler(
        lambda dask_scheduler: {str(k): ts.state for k, ts in dask_scheduler.tasks.items()}
    )


def _files(folder: Path) -> dict[str, int]:
    """Name -> mtime (ns) of every file under ``folder`` (but a temporary one being
    renamed into place)."""
    out = {}
    for p in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            out[str(p.relative_to(folder))] = p.stat().st_mtime_ns
    return out


# ------------------------------------------------------------------- a finished job stays done


def test_finished_local_job_is_released_and_never_rerun(patches, tmp_path):
    """Issue 11 item 2: the driver lets go of a local stage's task the moment it has its
    result (before any garbage collection: cycles through tracebacks used to keep the
    future, so Dask reran the finished task when a worker died); then killing every worker
    neither brings a deleted job's folder back nor rewrites a kept job's files."""
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    spec = _spec(patches, max_iter=15)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _cluster() as client:
            for out in (keep, gone):
                res = train(spec, out, client=client, execution="local")
                assert res.status == "succeeded" and res.execution == "local"
            _until(lambda: not _tasks(client), 5, "the scheduler forgets the stage tasks")
            assert not (keep / OWNER).exists()  # the driver let go of the folder
            before = _files(keep)
            shutil.rmtree(gone)
            pids = _pids(client)
            for pid in pids.values():
                _kill(pid)
            _back(client, set(pids))
            time.sleep(1.0)  # a rerun would have started (and written) by now
            assert _tasks(client) == {} and not any(client.processing().values())
    finally:
        if was_enabled:
            gc.enable()
    assert not gone.exists()
    assert _files(keep) == before


def test_late_rerun_of_an_ended_stage_writes_nothing(patches, tmp_path):
    """Issue 11 item 2, the worker's side: a client that still holds a finished stage task's
    future (as the driver used to) makes Dask rerun it when the worker holding its result
    dies. Once the driver has let go of the folder (``disown``), that rerun returns at once,
    superseded: it neither recreates a deleted folder nor rewrites a kept one's files."""
    from worker.execution import disown, run_local_stage
    from worker.schedule import build_network
    from worker.stage import Stage

    spec = _spec(patches, max_iter=6)
    net = build_network(spec, 36)
    with _cluster() as client:
        futures = {}
        for name in ("keep", "gone"):
            out = tmp_path / name
            out.mkdir()
            (out / OWNER).write_text(name)
            stage = Stage.of(
                net, net.init_theta(3), out, max_iter=6, execution="local", sample_shape=(6, 6)
            )
            futures[name] = client.submit(
                run_local_stage,
                stage,
                patches,
                owner=name,
                resume=False,
                pure=False,
            )
        for name, fut in futures.items():
            res = fut.result(timeout=60)
            assert res.status == "succeeded" and res.iterations == 6
            assert (tmp_path / name / "filters.png").is_file()
            disown(tmp_path / name, name)  # what the driver does once the stage has ended
        before = _files(tmp_path / "keep")
        shutil.rmtree(tmp_path / "gone")
        holders = {a for addrs in client.who_has(list(futures.values())).values() for a in addrs}
        pids = _pids(client)
        for address in holders:  # the workers holding the results: Dask reruns both tasks
            _kill(pids[address])
        _back(client, holders)

        def rerun(fut):
            with contextlib.suppress(Exception):  # the lost result, while being recomputed
                res = fut.result(timeout=5)
                return res if res.message.startswith("superseded") else None

        for fut in futures.values():
            res = _until(lambda f=fut: rerun(f), 60, "the rerun's result")
            assert res.status == "cancelled" and res.iterations == 0
    assert not (tmp_path / "gone").exists()
    assert _files(tmp_path / "keep") == before


def test_superseded_stage_stops_and_writes_no_model(patches, tmp_path):
    """A local stage task whose ``.owner`` changes while it trains (a newer run took over)
    stops at its next iteration without writing model.npz or filters.png again (here they
    hold iteration 0's parameters: refreshes are rarer than the run)."""
    from worker.execution import run_local_stage
    from worker.schedule import build_network
    from worker.stage import Stage

    net = build_network(_spec(patches), 36)
    out = tmp_path / "job"
    out.mkdir()
    (out / OWNER).write_text("first")
    stage = Stage.of(
        net,
        net.init_theta(3),
        out,
        optimizer="gd",
        options={"gtol": 0.0},
        max_iter=100_000,
        execution="local",
        sample_shape=(6, 6),
    )
    result: list = []
    task = threading.Thread(
        target=lambda: result.append(
            run_local_stage(stage, patches, owner="first", resume=False, refresh_seconds=1e6)
        ),
        daemon=True,
    )

    def pictures() -> tuple[int, bytes]:
        return (out / "filters.png").stat().st_mtime_ns, (out / "model.npz").read_bytes()

    task.start()
    try:
        _until(lambda: len(read_history(out / "history.json")) >= 3, 30, "3 iterations")
        before = pictures()  # written at iteration 0, next due in 1e6 s
    finally:
        (out / OWNER).write_text("second")  # stops the task, whatever happened
        task.join(60)
    assert not task.is_alive() and result[0].status == "cancelled"
    assert result[0].iterations < 100_000
    assert pictures() == before
    assert np.array_equal(_theta(out), net.init_theta(3))  # iteration 0's, never rewritten


# ------------------------------------------------------------------- the only worker killed


def _train_within(seconds: float, *args, **kwargs):
    """``train(*args, **kwargs)`` in a thread; fails the test if it has not returned within
    ``seconds`` (a job stuck for ever would otherwise hang the suite)."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = train(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the job did not end within {seconds:g} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.mark.slow
def test_only_worker_killed_mid_job_same_bits(patches, tmp_path):
    """A cluster of one worker, SIGKILLed at iteration 3 of a job (its nanny starts another):
    the job's tasks, pinned to the dead worker with ``allow_other_workers``, were ready while
    no worker ran, and Dask left them ``no-worker`` for ever (the job hung); the waits now have
    the scheduler place them, and each plan's job ends with bitwise the uninterrupted model."""
    with _cluster(workers=1) as client:
        for plan, n in (("distributed", 12), ("local", 120)):  # the local task still runs at 3
            spec = _spec(patches, max_iter=n)
            kw = dict(client=client, execution=plan, engine_options=PER_CHUNK)
            train(spec, tmp_path / f"{plan}-ref", **kw)
            pids, killed = _pids(client), []

            def on_iteration(e: dict, pids=pids, killed=killed) -> None:
                if e["iteration"] == 3 and not killed:
                    (address,) = pids
                    _kill(pids[address])
                    killed.append(address)

            res = _train_within(60, spec, tmp_path / plan, on_iteration=on_iteration, **kw)
            assert killed and res.status == "succeeded" and res.iterations == n, plan
            assert np.array_equal(_theta(tmp_path / plan), _theta(tmp_path / f"{plan}-ref"))
            _back(client, set(killed), n=1)


# ------------------------------------------------------------------- workers killed for memory


#: The functions the tasks of a job call first: a chunk's pass 1 (a stage in the driver), a
#: stage next to its data.
_TASKS = (("worker.chunks", "_chunk_pass1"), ("worker.execution", "run_local_stage"))


class _HogMemory(WorkerPlugin):
    """A worker plugin: on every worker (restarted ones too), the functions of
    :data:`_TASKS` become a task that allocates memory until the worker's nanny kills it
    (the functions of tasks are pickled by reference, so a job's tasks call it)."""

    def setup(self, worker) -> None:
        import importlib

        def hog(*args, **kwargs):
            blocks = []
            for _ in range(48):  # 3 GB at most, should the nanny not act
                blocks.append(np.ones(2**23))  # 64 MB, touched
                time.sleep(0.02)
            raise MemoryError("the nanny did not kill this worker")

        for module, name in _TASKS:
            setattr(importlib.import_module(module), name, hog)


@pytest.mark.slow
def test_worker_killed_for_memory_fails_the_job_saying_so(patches, tmp_path):
    """Issue 11 item 10: a task that takes more memory than its worker may have gets the
    worker killed by its nanny (for real, at 95% of a 500 MB limit); the job fails with an
    error naming memory, the limit, the chunk size and the options to change, the Dask
    KilledWorker chained (Dask gives up at the first death here). Both plans: a stage in
    the driver (a chunk's task dies) and a stage next to its data (its one task dies)."""
    import dask
    from distributed import KilledWorker

    from worker.engine import WorkersDied

    errors = {}
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with _cluster(memory_limit="500MB") as client:
            client.register_plugin(_HogMemory(), name="hog-memory")
            for plan in ("distributed", "local"):
                with pytest.raises(WorkersDied) as info:
                    train(
                        _spec(patches),
                        tmp_path / plan,
                        client=client,
                        execution=plan,
                        engine_options=PER_CHUNK,
                    )
                errors[plan] = info.value
    for plan, exc in errors.items():
        msg = str(exc)
        assert isinstance(exc.__cause__, KilledWorker)
        assert "memory" in msg and "500 MB" in msg, msg
        for option in ("--memory-limit", "--threads-per-worker", "--chunk-rows", "float32"):
            assert option in msg, msg
        assert "43.2 kB" in msg, msg  # a chunk: 150 rows x 36 features x 8 bytes
        assert ("--plan distributed" in msg) == (plan == "local"), msg


# ------------------------------------------------------------------- chaos: random kills


class _Chaos(threading.Thread):
    """SIGKILLs a random worker of ``client`` whenever a kill is due (``due``, raised by the
    job as it goes) and both workers are up, ``every`` seconds apart at least, after a random
    fraction of a second (so kills fall anywhere in an evaluation)."""

    def __init__(self, client, every: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.client, self.every = client, every
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.due = 0
        self.kills: list[str] = []

    def run(self) -> None:
        last = -float("inf")
        while not self.done.wait(0.05):
            if len(self.kills) >= self.due or time.monotonic() - last < self.every:
                continue
            with contextlib.suppress(Exception):  # a worker going away meanwhile
                pids = _pids(self.client)
                if len(pids) >= 2:
                    time.sleep(self.rng.uniform(0.0, 0.2))
                    victim = self.rng.choice(sorted(pids))
                    _kill(pids[victim])
                    self.kills.append(victim)
                    last = time.monotonic()

    def __enter__(self) -> _Chaos:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(30)


def _chaos_run(client, spec: TrainSpec, folder: Path, kills: int, every: float = 0.5) -> None:
    """The job of ``spec`` uninterrupted, then under :class:`_Chaos` with ``kills`` kills
    spread over its first 70% of history entries. However fast this machine is, they fall
    through the job: it waits (``on_iteration``, which changes no bits) when more than one
    kill behind, and near its end until all are done."""
    kw = dict(client=client, execution="distributed", engine_options=PER_CHUNK)
    ref = train(spec, folder / "ref", **kw)
    n = len(read_history(folder / "ref" / "history.json"))
    seen = []
    with _Chaos(client, every) as chaos:

        def pace(entry: dict) -> None:
            seen.append(entry)
            chaos.due = min(kills, int(np.ceil(kills * len(seen) / (0.7 * n))))
            behind = chaos.due if len(seen) >= 0.9 * n else chaos.due - 1
            _until(lambda: len(chaos.kills) >= behind, 60, f"{behind} kills", 0.02)

        hit = train(spec, folder / "hit", on_iteration=pace, **kw)
    assert len(chaos.kills) == kills, chaos.kills
    assert ref.status == hit.status == "succeeded"
    assert hit.iterations == ref.iterations and hit.execution == "distributed"
    assert np.array_equal(_theta(folder / "hit"), _theta(folder / "ref"))
    _back(client, set(chaos.kills))


@pytest.mark.slow
def test_chaos_kills_through_lbfgs_and_adam_jobs_same_bits(patches, tmp_path):
    """Three random workers SIGKILLed at random moments through a whole one-layer L-BFGS
    job evaluated in the driver chunk by chunk, then three through a stochastic Adam job
    (minibatches of 100 rows, 4 epochs): each ends with bitwise the uninterrupted model."""
    adam = dict(
        optimizer="adam",
        learning_rate=0.02,
        batch_size=100,
        epochs=4,
        log_every=4,
        checkpoint_every=6,
    )
    with _cluster() as client:
        _chaos_run(client, _spec(patches, max_iter=40), tmp_path / "lbfgs", kills=3)
        _chaos_run(client, _spec(patches, **adam), tmp_path / "adam", kills=3)


# ------------------------------------------------------------------- a scheduler restart


class _Dask:
    """A ``dask scheduler`` on a fixed port and one ``dask worker`` (nanny), as processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _start(self, module: str, *args: str) -> subprocess.Popen:
        with open(self.folder / f"{module.rsplit('_', 1)[-1]}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", f"distributed.cli.{module}", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
                start_new_session=True,
            )

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
            "--dashboard-address", "127.0.0.1:0",
        )  # fmt: skip

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _until(listening, 30, f"a scheduler at {self.address}")

    def start_worker(self) -> None:
        self.worker = self._start(
            "dask_worker", self.address, "--nthreads", "1", "--memory-limit", "1GB",
            "--no-dashboard",
        )  # fmt: skip

    @staticmethod
    def _end(proc: subprocess.Popen | None) -> None:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def kill_scheduler(self) -> None:
        self._end(self.scheduler)

    def restart_worker(self) -> None:
        """The worker closes itself when its scheduler goes away (its nanny with it, within
        seconds); end it now and start a new one against the scheduler at the same address."""
        self._end(self.worker)
        self.start_worker()

    def close(self) -> None:
        self._end(self.worker)
        self._end(self.scheduler)


ADAM_STEPS = {"optimizer": "adam", "batch_size": 32, "max_steps": 400, "learning_rate": 0.01}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "extra"),
    [("distributed", {}), ("local", {}), ("distributed", ADAM_STEPS)],
    ids=["distributed", "local", "adam-chained"],
)
def test_scheduler_restart_under_serve_same_model(tmp_path, plan, extra):
    """``sae serve --scheduler ADDR``: the scheduler is SIGKILLed and started again on the
    same port while a job runs (and a worker started against it); the job carries on in the
    same attempt (evaluations, the local stage's task and Adam's chain of steps since the
    last state the loop holds are sent again once the client has reconnected) and ends with
    bitwise the model of an uninterrupted job."""
    data, state = tmp_path / "data", tmp_path / "state"
    write_tiny(data, "tiny")
    spec = {"dataset": "tiny", "hidden": 5, "max_iter": 80, "seed": 3, **extra}
    if extra:
        del spec["max_iter"]
    dask_ = _Dask(tmp_path)
    try:
        dask_.start_scheduler()
        dask_.start_worker()
        args = ["--scheduler", dask_.address, "--plan", plan]
        with Server(data, state, args=args) as srv, srv.client() as http:
            ref = http.post("/jobs", json=spec).json()["id"]
            done = wait_job(http, ref)
            assert done["status"] == "succeeded"
            hit = http.post("/jobs", json=spec).json()["id"]
            wait_job(http, hit, lambda j: j["status"] == "running" and j["iteration"] >= 3)
            dask_.kill_scheduler()
            assert http.get(f"/jobs/{hit}").json()["status"] == "running"
            dask_.start_scheduler()
            dask_.restart_worker()
            job = wait_job(http, hit, timeout=120)
            assert job["status"] == "succeeded" and job["attempts"] == 1, job
            assert job["iteration"] == done["iteration"], job
    finally:
        dask_.close()
    a = load_arrays(state / "jobs" / ref / "model.npz")
    b = load_arrays(state / "jobs" / hit / "model.npz")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
