"""Crash and restart: a job killed with SIGKILL mid-run resumes from its checkpoint and ends
with the same model as an uninterrupted run; a clean stop puts running jobs back in the queue;
acknowledged jobs are never lost and none is left `running` with nobody running it."""

from __future__ import annotations

import sqlite3
import time

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


def test_random_sigkills_during_a_mix_of_jobs(tmp_path):
    """The service SIGKILLed at random moments, 3 times, while a mix of jobs runs (L-BFGS,
    Adam, a deep one): every job ends succeeded with the model of an uninterrupted run, and
    a job that had succeeded is never run again (its attempts and files stay as they were)."""
    import random

    data, state = tmp_path / "data", tmp_path / "state"
    write_tiny(data, "tiny")
    specs = {
        "lbfgs": SPEC,
        "adam": {
            "dataset": "tiny",
            "hidden": 5,
            "optimizer": "adam",
            "epochs": 6,
            "batch_size": 20,
            "learning_rate": 0.01,
            "seed": 3,
        },
        "deep": {
            "dataset": "tiny",
            "hidden": [6, 3],
            "max_iter": 15,
            "finetune_iter": 15,
            "seed": 3,
        },
    }
    rng = random.Random(11)
    ids: dict[str, str] = {}
    done: dict[str, tuple[int, int]] = {}  # job id -> (attempts, model mtime) once succeeded
    caught = 0  # kills that landed while a job was running
    for kill in range(4):
        server = Server(data, state, args=ARGS).start()
        try:
            with server.client() as http:
                for name, spec in specs.items():
                    r = http.post("/jobs", json=spec, headers={"Idempotency-Key": name})
                    ids[name] = r.json()["id"]
                for job_id, (attempts, mtime) in done.items():
                    j = http.get(f"/jobs/{job_id}").json()
                    model = state / "jobs" / job_id / "model.npz"
                    assert j["status"] == "succeeded" and j["attempts"] == attempts, j
                    assert model.stat().st_mtime_ns == mtime, "a finished job ran again"
                if kill < 3:
                    time.sleep(rng.uniform(0.5, 2.5))  # a random moment of the mix
                    running = http.get("/jobs", params={"status": "running"}).json()["total"]
                    caught += running > 0
                else:
                    for job_id in ids.values():
                        assert wait_job(http, job_id, timeout=180)["status"] == "succeeded"
                for job_id in ids.values():
                    j = http.get(f"/jobs/{job_id}").json()
                    if j["status"] == "succeeded" and job_id not in done:
                        model = state / "jobs" / job_id / "model.npz"
                        done[job_id] = (j["attempts"], model.stat().st_mtime_ns)
        finally:
            server.kill() if kill < 3 else server.stop()
    assert set(done) == set(ids.values())
    assert caught >= 1, "no kill landed while a job ran"
    models = {name: load_model(state / "jobs" / ids[name] / "model.npz") for name in specs}

    # the same jobs, uninterrupted, under other keys
    with Server(data, state, args=ARGS) as ref, ref.client() as http:
        for name, spec in specs.items():
            ref_id = http.post("/jobs", json=spec, headers={"Idempotency-Key": f"r{name}"})
            job = wait_job(http, ref_id.json()["id"], timeout=180)
            assert job["status"] == "succeeded" and job["attempts"] == 1
            want = load_model(state / "jobs" / job["id"] / "model.npz")
            for key in want:
                np.testing.assert_array_equal(models[name][key], want[key], err_msg=name)
