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


def test_a_job_interrupted_three_times_fails(store):
    job, _ = store.create({"dataset": "d"}, 10)
    for attempt in (1, 2):
        assert store.claim_next().attempts == attempt
        assert store.requeue_running() == [job.id]  # the process died while it ran
        assert store.get(job.id).status == "queued"
    assert store.claim_next().attempts == 3
    assert store.requeue_running() == []
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.finished_at is not None
    assert "interrupted 3 times" in failed.error
    assert store.claim_next() is None
