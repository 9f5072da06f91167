"""Faults of the machine: a full disk under the state folder, a corrupt chunk.

The state folder (jobs.db and the job folders) is a size-limited tmpfs that a filler file
fills while a job runs. The service must answer every request without a 500, free the job's
slot, record why the job failed once it can, take new jobs as soon as space is back, and
continue the failed job (``POST /jobs/ID/retry``) to the model of an uninterrupted run. The
store passes ``PRAGMA integrity_check`` at the end.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.service_fixtures import SAE, Server, child_env, load_model, wait_job, write_tiny

SPEC = {"dataset": "tiny", "hidden": 5, "max_iter": 80, "seed": 4}
ARGS = ["--plan", "distributed"]  # one Dask graph per evaluation: slow enough to fill mid-run


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "12m"):
    """A tmpfs of ``size`` mounted at ``path`` (needs root and a kernel that allows it)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (run as root in CI)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write ``path`` until the filesystem is full; return it."""
    block = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return path


def not_5xx_except_507(r) -> None:
    """A request on a full disk is answered, never with a 500 (507 names the storage)."""
    assert r.status_code < 500 or r.status_code == 507, (r.status_code, r.text)
    if r.status_code == 507:
        assert r.json()["detail"].startswith("storage: "), r.text


def test_a_full_state_disk_fails_the_job_clearly_and_the_service_recovers(tmp_path):
    data = tmp_path / "data"
    write_tiny(data, "tiny")
    with small_tmpfs(tmp_path / "state") as state:
        server = Server(data, state, args=ARGS, log=tmp_path / "serve.log").start()
        try:
            with server.client() as http:
                job_id = http.post("/jobs", json=SPEC).json()["id"]
                wait_job(http, job_id, lambda j: j["status"] == "running" and j["iteration"] >= 3)
                filler = fill(state / "filler")

                # the job's next checkpoint cannot be written: it stops and frees its slot
                deadline = time.monotonic() + 60
                while job_id in http.get("/health").json()["running"]:
                    assert time.monotonic() < deadline, "the job still holds its slot"
                    time.sleep(0.2)
                # every route answers while the disk is full, never with a 500
                for _ in range(3):
                    not_5xx_except_507(http.post("/jobs", json={**SPEC, "seed": 9}))
                not_5xx_except_507(http.post(f"/jobs/{job_id}/cancel"))
                # an upload is spooled into the state folder: the full disk is 507, not a 422
                buf = io.BytesIO()
                np.save(buf, np.random.default_rng(0).random((4096, 64)))
                gz = gzip.compress(buf.getvalue())
                up = http.post("/datasets", data={"name": "up"}, files={"file": ("x.npy.gz", gz)})
                assert up.status_code == 507 and up.json()["detail"].startswith("storage: "), (
                    up.text
                )
                not_5xx_except_507(http.get("/jobs"))
                not_5xx_except_507(http.get(f"/jobs/{job_id}"))

                filler.unlink()  # space is back: no restart
                job = wait_job(http, job_id, timeout=30)
                assert job["status"] == "failed", job
                assert job["error"].startswith("disk: no space left"), job["error"]
                assert "retry" in job["error"] and str(state) not in job["error"]

                # new work runs at once, and the failed job continues from its checkpoint
                ref_id = http.post("/jobs", json=SPEC).json()["id"]
                assert wait_job(http, ref_id)["status"] == "succeeded"
                cli = [*SAE, "retry", "--url", server.url, "--wait"]
                done = subprocess.run(
                    [*cli, job_id], capture_output=True, text=True, env=child_env()
                )
                assert done.returncode == 0, done.stdout + done.stderr
                assert wait_job(http, job_id)["status"] == "succeeded"
                r = http.post(f"/jobs/{ref_id}/retry")
                assert r.status_code == 409 and "not failed" in r.text, r.text
                refused = subprocess.run(
                    [*cli, ref_id], capture_output=True, text=True, env=child_env()
                )
                assert refused.returncode == 1 and "sae resume" in refused.stderr, refused
                assert "Traceback" not in refused.stderr
        finally:
            server.stop()
        with sqlite3.connect(state / "jobs.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ref = load_model(state / "jobs" / ref_id / "model.npz")
        got = load_model(state / "jobs" / job_id / "model.npz")
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        assert not list(state.rglob(".*.tmp")), "a failed write left its temporary file"


def test_a_job_error_names_the_chunk_not_the_servers_paths(tmp_path):
    data, state = tmp_path / "data", tmp_path / "state"
    path = write_tiny(data, "tiny")
    chunks = sorted(p for p in path.rglob("*") if p.is_file() and "/c/" in p.as_posix())
    chunks[1].write_bytes(b"not a chunk")  # chunk 1 of 4 is garbage now
    with Server(data, state) as server, server.client() as http:
        # sigmoid outputs: the submission reads the data's range and refuses it
        r = http.post("/jobs", json=SPEC)
        linear = {**SPEC, "output_activation": "linear"}  # no range read: the job reads it
        job = wait_job(http, http.post("/jobs", json=linear).json()["id"])
    assert r.status_code == 422, r.text
    assert "chunk 1 of tiny" in r.text, r.text
    assert job["status"] == "failed", job
    assert "chunk 1 of tiny" in job["error"], job["error"]
    for p in (data, data.resolve(), state.resolve(), tmp_path):
        assert str(p) not in job["error"] and str(p) not in r.text, (job["error"], r.text)


def test_retry_and_resume_refuse_a_job_whose_dataset_is_gone(tmp_path):
    from service import datasets, jobs
    from service.store import JobStore

    class Runner:
        def notify(self) -> None:
            pass

    data = tmp_path / "data"
    write_tiny(data, "tiny")
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create(SPEC, 80)
    store.claim_next()
    store.transition(job.id, ["running"], "failed", error="disk: ...")
    with pytest.raises(jobs.Conflict, match="not failed"):
        other, _ = store.create({**SPEC, "seed": 5}, 80)
        jobs.retry(other.id, store=store, runner=Runner(), data_root=data)
    datasets.delete_dataset(data, "tiny")
    for call in (
        lambda: jobs.retry(job.id, store=store, runner=Runner(), data_root=data),
        lambda: jobs.resume(job.id, None, store=store, runner=Runner(), data_root=data),
    ):
        with pytest.raises(jobs.Conflict, match="dataset: 'tiny' no longer exists"):
            call()
    assert store.get(job.id).status == "failed"
    write_tiny(data, "tiny")  # back: the retry queues it
    assert jobs.retry(job.id, store=store, runner=Runner(), data_root=data).status == "queued"
