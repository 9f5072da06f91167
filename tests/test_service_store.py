"""The job store, dataset names and settings on their own (no server, no cluster)."""

from __future__ import annotations

import threading

import pytest

from service import datasets
from service.settings import Settings
from service.store import TERMINAL, IdempotencyConflict, JobStore
from tests.service_fixtures import write_tiny


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_wal_and_queue_order(store, tmp_path):
    mode = store._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    ids = [store.create({"seed": i}, 10)[0].id for i in range(3)]
    claimed = [store.claim_next().id for _ in range(3)]
    assert claimed == ids and store.claim_next() is None
    assert all(store.get(i).status == "running" and store.get(i).attempts == 1 for i in ids)
    # a second store on the same file (a restarted process) sees everything
    again = JobStore(tmp_path / "jobs.db")
    assert sorted(again.requeue_running()) == sorted(ids)
    assert [j.status for j in again.list()[0]] == ["queued"] * 3
    again.close()


@pytest.mark.parametrize("terminal", TERMINAL)
def test_terminal_status_is_never_overwritten(store, terminal):
    job, _ = store.create({"a": 1}, 5)
    store.claim_next()
    assert store.transition(job.id, ["running"], terminal).status == terminal
    for new in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert store.transition(job.id, ["queued", "running"], new) is None
    assert store.get(job.id).status == terminal
    assert store.get(job.id).finished_at is not None
    assert not store.update_progress(job.id, iteration=3)
    assert store.requeue_running() == []


def test_compare_and_set_has_one_winner(store):
    job, _ = store.create({"a": 1}, 5)
    store.claim_next()
    wins = []

    def race(status):
        if store.transition(job.id, ["running"], status) is not None:
            wins.append(status)

    threads = [threading.Thread(target=race, args=(s,)) for s in TERMINAL * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get(job.id).status == wins[0]


def test_idempotency(store):
    a, created_a = store.create({"x": 1, "y": [1, 2]}, 5, "key")
    b, created_b = store.create({"y": [1, 2], "x": 1}, 5, "key")
    assert a.id == b.id and created_a and not created_b
    with pytest.raises(IdempotencyConflict):
        store.create({"x": 2}, 5, "key")
    assert store.list()[1] == 1


def test_names_resolve_inside_the_root(tmp_path):
    root = tmp_path / "data"
    write_tiny(root, "a/b")
    write_tiny(tmp_path, "elsewhere")
    (root / "link").symlink_to(tmp_path / "elsewhere")
    (root / "a" / "up").symlink_to(root)
    assert datasets.resolve(root, "a/b") == (root / "a" / "b").resolve()
    for bad in ["../elsewhere", "/etc", "a/../../elsewhere", "", ".", "a//b", ".hidden", "a\\b"]:
        with pytest.raises(datasets.BadName):
            datasets.resolve(root, bad)
    with pytest.raises(datasets.BadName):
        datasets.resolve(root, "link")
    with pytest.raises(datasets.BadName):
        datasets.resolve(root, "a/up")  # resolves to the root itself
    assert [d["name"] for d in datasets.list_datasets(root)] == ["a/b"]
    with pytest.raises(datasets.NotFound):
        datasets.get_dataset(root, "a")


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_DATA_ROOT", str(tmp_path / "d"))
    monkeypatch.setenv("SAE_TOKEN", "t")
    monkeypatch.setenv("SAE_MAX_CONCURRENT_JOBS", "3")
    monkeypatch.setenv("SAE_SCHEDULER", "tcp://10.0.0.1:8786")
    s = Settings()
    assert s.data_root == tmp_path / "d" and s.token == "t"
    assert s.max_concurrent_jobs == 3 and s.scheduler == "tcp://10.0.0.1:8786"
    assert Settings(token="u").token == "u"  # arguments win over the environment


def test_a_job_crashing_three_times_without_progress_fails(store):
    job, _ = store.create({"dataset": "d"}, 10)
    for attempt in (1, 2):
        assert store.claim_next().attempts == attempt
        assert store.requeue_running() == [job.id]  # the process died while it ran
        assert store.get(job.id).status == "queued"
        assert store.get(job.id).crashes == attempt
    assert store.claim_next().attempts == 3
    assert store.requeue_running() == []
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.finished_at is not None
    assert "crashed 3 times in a row" in failed.error and "retry" in failed.error
    assert store.claim_next() is None
    # a retry (POST /jobs/ID/retry) gives it a fresh budget and resumes its checkpoint
    again = store.resume(job.id)
    assert again.status == "queued" and again.crashes == 0 and again.attempts == 3


def test_crashes_after_progress_and_clean_stops_do_not_use_up_the_budget(store):
    job, _ = store.create({"dataset": "d"}, 100)
    for it in range(1, 8):  # seven crashes, each after the run made an iteration of progress
        store.claim_next()
        assert store.update_progress(job.id, iteration=it, progress=it / 100)
        assert store.requeue_running() == [job.id]
        assert store.get(job.id).crashes == 0
    for _ in range(5):  # crashes between clean stops (SIGTERM: the runner queues its jobs
        store.claim_next()  # itself and starts their count again)
        assert store.requeue_running() == [job.id] and store.get(job.id).crashes == 1
        store.claim_next()
        assert store.transition(job.id, ["running"], "queued", crashes=0) is not None
    assert store.get(job.id).crashes == 0 and store.get(job.id).attempts == 17
    store.claim_next()  # a deep job moving to its next stage is progress too
    store.update_progress(job.id, iteration=7, stage="fine-tune")
    assert store.requeue_running() == [job.id] and store.get(job.id).crashes == 0
    for n in (1, 2):  # then crashes without progress count again, from zero
        store.claim_next()
        assert store.requeue_running() == [job.id] and store.get(job.id).crashes == n
    store.claim_next()
    assert store.requeue_running() == [] and store.get(job.id).status == "failed"


def test_the_outcome_of_an_old_run_never_lands_on_a_newer_one(store):
    job, _ = store.create({"dataset": "d"}, 10)
    first = store.claim_next().attempts
    store.transition(job.id, ["running"], "cancelled")
    store.resume(job.id)
    second = store.claim_next().attempts
    assert second != first
    # the first run's outcome, written late (it waited for a full disk), changes nothing
    assert store.transition(job.id, ["running"], "failed", run=first, error="old") is None
    assert store.get(job.id).status == "running"
    assert store.transition(job.id, ["running"], "succeeded", run=second).status == "succeeded"


def test_an_older_store_gains_the_crash_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,"
        " status TEXT NOT NULL, spec TEXT NOT NULL, spec_hash TEXT NOT NULL,"
        " idempotency_key TEXT UNIQUE, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " started_at REAL, finished_at REAL, iteration INTEGER NOT NULL DEFAULT 0,"
        " max_iter INTEGER NOT NULL DEFAULT 0, cost REAL, grad_norm REAL, stage TEXT,"
        " progress REAL NOT NULL DEFAULT 0, eta_seconds REAL, error TEXT,"
        " attempts INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO jobs (id, status, spec, spec_hash, created_at, updated_at, attempts)"
        " VALUES ('old', 'running', '{}', 'h', 0, 0, 2);"
    )
    conn.commit()
    conn.close()
    store = JobStore(path)
    assert store.get("old").crashes == 0
    assert store.requeue_running() == ["old"]  # claimed before the upgrade: not counted
    assert store.claim_next().id == "old"
