"""Crash and restart: a job killed with SIGKILL mid-run resumes from its checkpoint and ends
with the same model as an uninterrupted run; a clean stop puts running jobs back in the queue;
acknowledged jobs are never lost and none is left `running` with nobody running it."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from tests.service_fixtures import Server, load_model, wait_job, write_tiny

SPEC = {"dataset": "tiny", "hidden": 5, "max_iter": 60, "seed": 3}
# every evaluation one Dask graph driven by the service: slow enough to interrupt mid-run
ARGS = ["--plan", "distributed"]


def _statuses(db) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, status FROM jobs"))


def _no_orphans(http) -> None:
    """Every job the store says is running is run by the server."""
    listed = http.get("/jobs", params={"status": "running"}).json()["items"]
    running_here = set(http.get("/health").json()["running"])
    for job in listed:
        if job["id"] not in running_here:
            assert http.get(f"/jobs/{job['id']}").json()["status"] != "running", job


@pytest.mark.bitwise
def test_kill_restart_resumes_to_the_same_model(tmp_path):
    data, state = tmp_path / "data", tmp_path / "state"
    write_tiny(data, "tiny")
    db = state / "jobs.db"

    a = Server(data, state, args=ARGS).start()
    try:
        with a.client() as http:
            ids = [
                http.post("/jobs", json=SPEC, headers={"Idempotency-Key": k}).json()["id"]
                for k in ("J", "R", "U")
            ]
            j_id, r_id, u_id = ids
            wait_job(http, j_id, lambda j: j["status"] == "running" and j["iteration"] >= 3)
    finally:
        a.kill()
    # the crash leaves J running in the store, R and U queued
    assert _statuses(db) == {j_id: "running", r_id: "queued", u_id: "queued"}

    b = Server(data, state, args=ARGS).start()
    try:
        with b.client() as http:
            _no_orphans(http)
            # a retried submission after the crash still finds its job
            again = http.post("/jobs", json=SPEC, headers={"Idempotency-Key": "J"}).json()
            assert again["id"] == j_id
            j = wait_job(http, j_id)
            assert j["status"] == "succeeded" and j["attempts"] == 2
            wait_job(http, r_id, lambda r: r["status"] == "running" and r["iteration"] >= 2)
            _no_orphans(http)
    finally:
        b.stop()  # SIGTERM: a clean stop interrupts R and puts it back in the queue
    statuses = _statuses(db)
    assert statuses[r_id] == "queued" and statuses[u_id] == "queued", statuses

    with Server(data, state, args=ARGS) as c, c.client() as http:
        jobs = {i: wait_job(http, i) for i in ids}
        assert {i: j["status"] for i, j in jobs.items()} == dict.fromkeys(ids, "succeeded")
        assert jobs[u_id]["attempts"] == 1 and jobs[r_id]["attempts"] == 2
        models = {i: load_model(state / "jobs" / i / "model.npz") for i in ids}
        histories = {i: http.get(f"/jobs/{i}/history").json() for i in ids}
        _no_orphans(http)

    ref = models[u_id]
    for i in (j_id, r_id):
        assert set(models[i]) == set(ref)
        for key in ref:
            np.testing.assert_array_equal(models[i][key], ref[key], err_msg=f"{i} {key}")
        assert histories[i] == histories[u_id] or _same_costs(histories[i], histories[u_id])


def _same_costs(h1, h2) -> bool:
    def costs(h):
        entries = h if isinstance(h, list) else h.get("entries", [])
        return [(e.get("iteration"), e.get("cost", e.get("J"))) for e in entries]

    return costs(h1) == costs(h2)
