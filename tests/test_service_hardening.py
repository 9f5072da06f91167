"""Defects found in review of the service, each pinned by a test.

Two real `sae serve` processes under uvicorn for the module (one open, one with a token), and
the job runner in-process on a real LocalCluster for the two races of the runner.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service import datasets
from service.runner import Runner, stage_of
from service.settings import Settings
from service.store import JobStore
from tests.service_fixtures import Server, tiny_data, wait_job, write_tiny
from worker.spec import TrainSpec

TOKEN = "hardening-token"
MAX_DATASET_BYTES = 200_000
MAX_ENCODE_VALUES = 100  # a 16-4-16 model: 20 output values a row, so 5 rows
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("open")
    data = base / "data"
    write_tiny(data, "p")
    write_tiny(data, "idem")
    (data / "afile").write_text("not a folder")
    srv = Server(
        data,
        base / "state",
        args=["--plan", "local", "--log-level", "info"],
        env={
            "SAE_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES),
            "SAE_MAX_ENCODE_VALUES": str(MAX_ENCODE_VALUES),
        },
    )
    with srv:
        yield srv


@pytest.fixture(scope="module")
def tok_srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    write_tiny(base / "data", "p")
    with Server(base / "data", base / "state", token=TOKEN, args=["--plan", "local"]) as srv:
        yield srv


def _loc(r) -> list[list]:
    return [e["loc"] for e in r.json()["detail"]]


# ------------------------------------------------------------------ 1. non-finite JSON numbers


def test_non_finite_numbers_give_422_naming_the_field(open_srv):
    with open_srv.client() as http:
        r = http.post("/jobs", content=b'{"dataset":"p","max_iter":1e400}', headers=JSON)
        assert r.status_code == 422, r.text
        assert ["body", "max_iter"] in _loc(r)
        assert r.json()["detail"][0]["input"] == "inf"
        r = http.post("/jobs", content=b'{"dataset":"p","hidden":4,"rho":NaN}', headers=JSON)
        assert r.status_code == 422, r.text
        assert ["body", "rho"] in _loc(r)
        r = http.post("/jobs/abc/encode", content=b'{"X":NaN}', headers=JSON)
        assert r.status_code == 422, r.text
        assert ["body", "X"] in _loc(r)


# ------------------------------------------------------ 2, 12. encode cap; cancel of a finished job


def test_encode_output_cap_and_finished_job_cancel(open_srv):
    with open_srv.client() as http:
        r = http.post("/jobs", json={"dataset": "p", "hidden": 4, "max_iter": 5, "seed": 3})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        X = tiny_data(m=6).tolist()
        ok = http.post(f"/jobs/{job_id}/encode", json={"X": X[:5]})  # 5 x (4 + 16) = 100
        assert ok.status_code == 200, ok.text
        assert np.asarray(ok.json()["hidden"]).shape == (5, 4)
        r = http.post(f"/jobs/{job_id}/encode", json={"X": X})  # 6 x 20 = 120 > 100
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "X"]]
        assert "limit of 100" in r.json()["detail"][0]["msg"]
        r = http.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 409, r.text


# ---------------------------------------------------------------------- 3. runner races


def _runner(tmp_path, store_cls=JobStore):
    settings = Settings(
        data_root=tmp_path / "data", state_dir=tmp_path / "state", workers=1, memory_limit="1GiB"
    )
    write_tiny(settings.data_root, "p")
    store = store_cls(settings.db_path)
    seen = SimpleNamespace(stopped=False, calls=0)

    def train(spec, out_dir, *, should_stop, on_iteration, report=True, **_):
        """Iterates until told to stop (or 400 steps); reports progress if ``report``."""
        for i in range(400):
            if should_stop():
                seen.stopped = True
                return SimpleNamespace(status="stopped")
            seen.calls = i
            if report:
                on_iteration({"iteration": i, "cost": 1.0 / (i + 1)})
            time.sleep(0.02)
        return SimpleNamespace(status="succeeded")

    return settings, store, seen, train


def _wait_idle(runner: Runner, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while runner.running_ids() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_cancel_the_runner_did_not_hear_of_stops_the_job(tmp_path):
    settings, store, seen, train = _runner(tmp_path)
    runner = Runner(settings, store, train_fn=train)
    job, _ = store.create({"dataset": "p", "hidden": 4, "max_iter": 400}, 400)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while (store.get(job.id).iteration < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        # e.g. another service process on the same database cancelled it
        assert store.transition(job.id, ["running"], "cancelled") is not None
        _wait_idle(runner)
        assert seen.stopped and seen.calls < 399
        assert store.get(job.id).status == "cancelled"
    finally:
        runner.stop()


def test_a_cancel_between_claim_and_register_is_not_lost(tmp_path):
    class RacyStore(JobStore):
        """Lets a cancel run right after a job is claimed, before the runner registers it."""

        runner: Runner | None = None
        raced = False

        def claim_next(self):
            job = super().claim_next()
            if job is not None and not self.raced:
                self.raced = True
                t = threading.Thread(target=self.runner.cancel, args=(job.id,))
                t.start()
                t.join(0.5)  # with the lock held by the dispatcher, it waits for us
            return job

    settings, store, seen, train = _runner(tmp_path, RacyStore)
    runner = Runner(settings, store, train_fn=lambda *a, **k: train(*a, **k, report=False))
    store.runner = runner
    job, _ = store.create({"dataset": "p", "hidden": 4, "max_iter": 400}, 400)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not store.raced and time.monotonic() < deadline:
            time.sleep(0.05)
        # the job is registered once the claim returns (the cancel waits for that)
        while not (seen.stopped or seen.calls >= 399) and time.monotonic() < deadline:
            time.sleep(0.05)
        _wait_idle(runner)
        assert seen.stopped and seen.calls < 399
        assert store.get(job.id).status == "cancelled"
    finally:
        runner.stop()


# ------------------------------------------------------------------------- 4. token hygiene


def test_query_token_only_on_browser_routes(tok_srv):
    with tok_srv.client() as http:
        job_id = http.post("/jobs", json={"dataset": "p", "hidden": 4, "max_iter": 3}).json()["id"]
    with tok_srv.client(token=None) as anon:
        for path in ["/jobs", "/datasets", f"/jobs/{job_id}"]:
            assert anon.get(path, params={"token": TOKEN}).status_code == 401, path
        assert anon.get(f"/jobs/{job_id}/history", params={"token": TOKEN}).status_code == 200
        assert anon.get(f"/jobs/{job_id}/history").status_code == 401


def test_access_log_redacts_tokens(open_srv):
    # (a request the log keeps: successful polling GETs such as /jobs are left out of it)
    with open_srv.client() as http:
        r = http.get("/jobs/nope", params={"token": "leaky-value-123", "limit": 1})
        assert r.status_code >= 400
    time.sleep(0.3)
    log = open_srv.log.read_text()
    assert "/jobs/nope?token=***&limit=1" in log
    assert "leaky-value-123" not in log


# ------------------------------------------------------------------------ 5. ingestion caps


def _idx_gz(a: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return gzip.compress(head + a.astype(np.uint8).tobytes())


def test_gzip_idx_and_photographs_are_capped(open_srv):
    with open_srv.client() as http:
        big = _idx_gz(np.zeros((1000, 28, 28)))  # 784,016 bytes once decompressed
        assert len(big) < MAX_DATASET_BYTES
        r = http.post("/datasets", data={"name": "bomb"}, files={"file": ("x.gz", big)})
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "file"]]
        assert "decompresses to more than" in r.text
        assert http.get("/datasets/bomb").status_code == 404
        small = _idx_gz(np.arange(20 * 16).reshape(20, 4, 4) % 256)
        r = http.post("/datasets", data={"name": "idxok"}, files={"file": ("x.gz", small)})
        assert r.status_code == 201, r.text
        assert r.json()["shape"] == [20, 16]
        # 1000 patches x 64 values x 8 bytes = 512,000 > 200,000
        r = http.post("/datasets/photographs", json={"name": "photos", "n_patches": 1000})
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "n_patches"]]


# ------------------------------------------------- 6, 7, 8. names: files, races, newlines


def test_a_dataset_under_a_regular_file_is_422(open_srv):
    with open_srv.client() as http:
        r = http.post("/datasets/photographs", json={"name": "afile/x", "n_patches": 10})
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "name"]]
        buf = io.BytesIO()
        np.save(buf, tiny_data(m=10))
        files = {"file": ("x.npy", buf.getvalue())}
        r = http.post("/datasets", data={"name": "afile/y"}, files=files)
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "name"]]


def test_concurrent_uploads_of_one_name_give_409(open_srv):
    buf = io.BytesIO()
    np.save(buf, tiny_data(m=4000, n=16))  # 512 KB: the two uploads overlap
    body = buf.getvalue()
    barrier = threading.Barrier(2)
    codes, texts = [], []

    def upload():
        with open_srv.client() as http:
            barrier.wait()
            r = http.post("/datasets", data={"name": "race"}, files={"file": ("x.npy", body)})
            codes.append(r.status_code)
            texts.append(r.text)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201, 409], texts
    assert not any(str(open_srv.data_root) in t for t in texts)


@pytest.mark.parametrize("name", ["abc\n", "a/b\n", "a\n/b"])
def test_names_ending_in_a_newline_are_refused(open_srv, name):
    with pytest.raises(datasets.BadName):
        datasets.check_name(name)
    with open_srv.client() as http:
        r = http.post("/datasets/photographs", json={"name": name, "n_patches": 10})
        assert r.status_code == 422, r.text
        assert _loc(r) == [["body", "name"]]


# ------------------------------------------------------------------------------- 10. health


def test_health_hides_the_cluster_from_strangers(tok_srv):
    with tok_srv.client(token=None) as anon:
        assert anon.get("/health").json() == {"status": "ok"}
    with tok_srv.client(token="wrong") as bad:
        assert bad.get("/health").json() == {"status": "ok"}
    with tok_srv.client() as http:
        h = http.get("/health").json()
        assert h["status"] == "ok" and "running" in h and "scheduler" in h


# -------------------------------------------------------------------- 11. deep-job progress


def test_deep_progress_follows_spec_stages():
    spec = TrainSpec(dataset="p", hidden=[8, 4, 8], max_iter=10, finetune_iter=5, stages=1)
    assert spec.total_iterations() == 15
    assert stage_of({"stage": "pretrain 1/1", "iteration": 3}, spec) == ("pretrain 1 of 1", 0)
    assert stage_of({"stage": "finetune"}, spec) == ("fine-tune", 10)
    none = TrainSpec(dataset="p", hidden=[8, 4], max_iter=10, finetune_iter=5, pretrain="none")
    assert none.total_iterations() == 5
    assert stage_of({"stage": "finetune"}, none) == ("fine-tune", 0)
    three = TrainSpec(dataset="p", hidden=[8, 6, 4], max_iter=10, finetune_iter=5)
    assert three.total_iterations() == 35
    assert stage_of({"stage": "pretrain 2/3"}, three) == ("pretrain 2 of 3", 10)


# --------------------------------------------------------------- 12. idempotent retries


def test_retries_are_idempotent(open_srv):
    spec = {"dataset": "idem", "hidden": 4, "max_iter": 100000, "seed": 5}
    with open_srv.client() as http:
        r = http.post("/jobs", json=spec, headers={"Idempotency-Key": "k-idem"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        first = http.post(f"/jobs/{job_id}/cancel")
        assert first.status_code == 200 and first.json()["status"] == "cancelled"
        again = http.post(f"/jobs/{job_id}/cancel")
        assert again.status_code == 200, again.text
        assert again.json()["id"] == job_id and again.json()["status"] == "cancelled"
        assert http.delete("/datasets/idem").status_code == 204
        # the retry of the submission answers with the job made, though its dataset is gone
        r = http.post("/jobs", json=spec, headers={"Idempotency-Key": "k-idem"})
        assert r.status_code == 202, r.text
        assert r.json()["id"] == job_id
        r = http.post("/jobs", json={**spec, "seed": 6}, headers={"Idempotency-Key": "k-idem"})
        assert r.status_code == 409, r.text


# --------------------------------------------------------------------------- 14. CSRF


def test_cross_site_unsafe_requests_are_refused_without_a_token(open_srv):
    spec = {"dataset": "p", "hidden": 4, "max_iter": 1}
    with open_srv.client() as http:
        r = http.post("/jobs", json=spec, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403, r.text
        r = http.post("/jobs", json=spec, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, r.text
        r = http.delete("/datasets/p", headers={"Origin": "null"})
        assert r.status_code == 403, r.text
        assert http.get("/datasets/p").status_code == 200
        same = f"http://127.0.0.1:{open_srv.port}"
        r = http.post(
            "/jobs",
            json=spec,
            headers={"Origin": same, "Sec-Fetch-Site": "same-origin"},
        )
        assert r.status_code == 202, r.text
        assert http.get("/jobs", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_csrf_check_is_off_with_a_token(tok_srv):
    with tok_srv.client() as http:
        r = http.post(
            "/jobs",
            json={"dataset": "p", "hidden": 4, "max_iter": 1},
            headers={"Origin": "http://elsewhere.example"},
        )
        assert r.status_code == 202, r.text


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("tcp")
        if c.status == "LISTEN" and c.pid == pid
    }


def test_the_embedded_dashboard_listens_on_loopback_unless_asked():
    """The Dask dashboard has no authentication and shows job names, dataset paths and
    tracebacks: an embedded cluster serves it on 127.0.0.1 unless dashboard_host says more."""
    from urllib.parse import urlparse

    from worker.cluster import get_client

    for host, expected in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        with get_client(workers=1, dashboard_host=host) as (client, _):
            port = urlparse(client.dashboard_link).port
            assert (expected, port) in _listening(os.getpid()), (host, client.dashboard_link)


def test_an_empty_token_is_refused_not_an_open_service(monkeypatch):
    from click.testing import CliRunner

    from service.cli import main as sae

    res = CliRunner().invoke(sae, ["serve", "--token", "", "--port", "0"])
    assert res.exit_code == 1 and res.output.startswith("Error: token: an empty token")
    assert "Traceback" not in res.output
    monkeypatch.setenv("SAE_TOKEN", "  ")
    res = CliRunner().invoke(sae, ["serve", "--port", "0"])
    assert res.exit_code == 1 and "token: an empty token" in res.output


def test_a_restart_removes_what_killed_uploads_and_ingests_left_behind(tmp_path):
    """Spooled uploads in the state folder, and scratch folders of writes in progress that
    nothing touched for 10 minutes, are removed when the service starts; a younger scratch
    folder (an ingest running in another process), datasets and other files stay."""
    import time as _time

    from tests.service_fixtures import Server, write_tiny

    data, state = tmp_path / "data", tmp_path / "state"
    write_tiny(data, "tiny")
    old = _time.time() - 2 * 86400
    stale = [
        data / ".big.tmp-0123abcd",
        data / "nested" / ".x.raw-deadbeef",
        data / ".tiny.old-01234567",  # an overwrite's old version; tiny itself is there
    ]
    for d in stale:
        (d / "X" / "c").mkdir(parents=True)
        (d / "X" / "c" / "0").write_bytes(b"\0" * 1000)
        for p in [d, *d.rglob("*")]:
            os.utime(p, (old, old))
    young = data / ".other.tmp-89abcdef"
    (young / "X").mkdir(parents=True)
    only_copy = data / ".gone.old-fedcba98"  # killed between an overwrite's two renames
    write_tiny(data, ".gone.old-fedcba98")
    for p in [only_copy, *only_copy.rglob("*")]:
        os.utime(p, (old, old))
    state.mkdir()
    spooled = [state / "tmpk2j4.upload", state / "tmpk2j4.upload.raw"]
    for p in spooled:
        p.write_bytes(b"\0" * 1000)
    keep = [data / ".keep", state / "notes.txt"]
    for p in keep:
        p.write_text("x")
    with Server(data, state) as srv, srv.client() as http:
        assert http.get("/health").status_code == 200
        for p in stale + spooled:
            assert not p.exists(), p
        for p in [young, *keep, data / "tiny"]:
            assert p.exists(), p
        assert http.get("/datasets/tiny").status_code == 200
        assert not only_copy.exists() and http.get("/datasets/gone").status_code == 200
