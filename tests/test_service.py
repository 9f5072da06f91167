"""End to end over HTTP against `sae serve` (uvicorn) with a real LocalCluster.

One server for the module (with a bearer token, small body limits); restart tests start their
own servers in test_service_restart.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import time

import numpy as np
import pytest
from click.testing import CliRunner

from service.cli import main as sae
from tests.service_fixtures import (
    TERMINAL,
    Server,
    load_model,
    sigmoid,
    tiny_data,
    wait_job,
    write_tiny,
)

TOKEN = "s3cret-token"
BODY_LIMIT = 64 * 1024
UPLOAD_LIMIT = 512 * 1024
SMALL = {"dataset": "tiny", "hidden": 4, "max_iter": 15, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("svc")
    data = base / "data"
    write_tiny(data, "tiny")
    write_tiny(data, "nested/tiny2", tiny_data(seed=2))
    write_tiny(data, "wide", tiny_data(low=-3, high=3))
    write_tiny(base / "outside", "secret")
    (data / "escape").symlink_to(base / "outside" / "secret")
    srv = Server(
        data,
        base / "state",
        token=TOKEN,
        args=[
            "--plan",
            "distributed",
            "--max-body-bytes",
            str(BODY_LIMIT),
            "--max-upload-bytes",
            str(UPLOAD_LIMIT),
        ],
    )
    with srv:
        yield srv


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


def submit(http, spec, **headers):
    r = http.post("/jobs", json=spec, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


# ---------------------------------------------------------------------------- jobs


def test_submit_watch_download_encode(server, http, tmp_path):
    r = http.post("/jobs", json=SMALL)
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/jobs/{body['id']}"
    assert body["links"]["history"] == f"/jobs/{body['id']}/history"
    job_id = body["id"]

    job = wait_job(http, job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["finished_at"] >= job["started_at"]
    assert job["iteration"] <= SMALL["max_iter"] and job["max_iter"] == SMALL["max_iter"]
    assert job["dashboard_url"]

    history = http.get(f"/jobs/{job_id}/history").json()
    entries = history if isinstance(history, list) else history.get("entries", history)
    assert len(entries) >= 2
    assert np.isclose(entries[-1].get("cost", entries[-1].get("J")), job["cost"])

    for name in ("filters.png", "cost.png"):
        r = http.get(f"/jobs/{job_id}/{name}")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"

    # download with the CLI client
    out = tmp_path / "dl"
    res = CliRunner().invoke(
        sae, ["download", job_id, str(out), "--url", server.url, "--token", TOKEN]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.npz", "history.json", "filters.png", "cost.png"]
    )
    assert json.loads((out / "history.json").read_text()) == history
    model = load_model(out / "model.npz")

    # encode, checked against a forward pass written out here
    X = tiny_data(m=5, seed=9)
    r = http.post(f"/jobs/{job_id}/encode", json={"X": X.tolist()})
    assert r.status_code == 200, r.text
    enc = r.json()
    W1, b1, W2, b2 = (model[k] for k in ("W1", "b1", "W2", "b2"))
    assert W1.shape == (4, 16) and W2.shape == (16, 4)
    a2 = sigmoid(X @ W1.T + b1)
    np.testing.assert_allclose(enc["hidden"], a2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(enc["reconstruction"], sigmoid(a2 @ W2.T + b2), rtol=1e-12)

    r = http.post(f"/jobs/{job_id}/encode", json={"X": [[0.5] * 3]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "X"

    # the CLI sees the job too
    res = CliRunner().invoke(sae, ["status", job_id, "--url", server.url, "--token", TOKEN])
    assert res.exit_code == 0 and "succeeded" in res.output
    res = CliRunner().invoke(sae, ["jobs", "--url", server.url, "--token", TOKEN])
    assert job_id in res.output


def test_cli_submit_and_wait(server, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SMALL, "seed": 5}))
    args = ["--url", server.url, "--token", TOKEN]
    res = CliRunner().invoke(sae, ["submit", str(spec), *args])
    assert res.exit_code == 0, res.output
    job_id = res.output.strip().splitlines()[-1]
    res = CliRunner().invoke(sae, ["wait", job_id, "--interval", "0.2", *args])
    assert res.exit_code == 0, res.output
    assert "succeeded" in res.output


def test_cancel_stops_within_an_evaluation(server, http):
    job_id = submit(http, {**SMALL, "max_iter": 100000, "seed": 2, "optimizer": "gd"})
    wait_job(http, job_id, lambda j: j["status"] == "running" and j["iteration"] >= 2)
    r = http.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    at_cancel = r.json()["iteration"]
    deadline = time.monotonic() + 30
    while job_id in http.get("/health").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    history = http.get(f"/jobs/{job_id}/history").json()
    entries = history if isinstance(history, list) else history.get("entries", history)
    # the iteration under way when the cancel came may finish, no more
    assert entries[-1]["iteration"] <= at_cancel + 1
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    # a terminal status is never overwritten; a retried cancel answers 200 with the job
    again = http.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    # its last checkpoint comes back, marked partial (issue 10)
    r = http.get(f"/jobs/{job_id}/model.npz")
    assert r.status_code == 200 and r.headers["X-SAE-Partial"] == "true"


def test_queued_jobs_run_in_order_and_delete(server, http):
    ids = [submit(http, {**SMALL, "max_iter": 3, "seed": 10 + i}) for i in range(3)]
    jobs = [wait_job(http, i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    starts = [j["started_at"] for j in jobs]
    assert starts == sorted(starts)
    # concurrency limit 1: each started after the previous one finished
    for a, b in zip(jobs, jobs[1:], strict=False):
        assert b["started_at"] >= a["finished_at"]

    page = http.get("/jobs", params={"status": "succeeded", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["total"] >= 3
    assert all(j["status"] == "succeeded" for j in page["items"])
    page2 = http.get("/jobs", params={"status": "succeeded", "limit": 2, "offset": 2}).json()
    assert not {j["id"] for j in page["items"]} & {j["id"] for j in page2["items"]}

    assert http.delete(f"/jobs/{ids[0]}").status_code == 204
    assert http.get(f"/jobs/{ids[0]}").status_code == 404
    assert http.get(f"/jobs/{ids[0]}/history").status_code == 404
    assert http.delete(f"/jobs/{ids[0]}").status_code == 404


def test_idempotent_retry(server, http):
    before = http.get("/jobs").json()["total"]
    spec = {**SMALL, "max_iter": 2, "seed": 30}
    a = http.post("/jobs", json=spec, headers={"Idempotency-Key": "retry-1"})
    b = http.post("/jobs", json=spec, headers={"Idempotency-Key": "retry-1"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert http.get("/jobs").json()["total"] == before + 1
    c = http.post("/jobs", json={**spec, "seed": 31}, headers={"Idempotency-Key": "retry-1"})
    assert c.status_code == 409 and "Idempotency-Key" in c.json()["detail"]
    wait_job(http, a.json()["id"])


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rho": 0}, "rho"),
        ({"rho": 1}, "rho"),
        ({"rho": 1.5}, "rho"),
        ({"lam": -1}, "lam"),
        ({"beta": -0.5}, "beta"),
        ({"hidden": 0}, "hidden"),
        ({"hidden": [8, 0]}, "hidden"),
        ({"hidden": 10**9}, "hidden"),
        ({"hidden": [50000, 50000]}, "hidden"),
        ({"optimizer": "newton"}, "optimizer"),
        ({"activation": "swish"}, "activation"),
        ({"max_iter": -1}, "max_iter"),
        ({"max_iter": 10**12}, "max_iter"),
        ({"dtype": "int8"}, "dtype"),
        ({"dataset": "no-such-data"}, "dataset"),
        ({"dataset": "wide"}, "output_activation"),
        ({"dataset": "wide", "output_activation": "sigmoid"}, "output_activation"),
        ({"activation": "linear"}, "rho"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_spec_names_the_field(http, change, field):
    r = http.post("/jobs", json={**SMALL, **change})
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert any(field in map(str, d["loc"]) for d in detail), detail


def test_data_outside_unit_interval_trains_with_linear_outputs(http):
    job_id = submit(
        http, {"dataset": "wide", "hidden": 3, "max_iter": 3, "output_activation": "linear"}
    )
    assert wait_job(http, job_id)["status"] == "succeeded"


def test_malformed_bodies(http):
    r = http.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = http.post("/jobs", json=[1, 2, 3])
    assert r.status_code == 422
    r = http.post("/jobs/0123/encode", json={"X": [[1.0]]})
    assert r.status_code == 404


# ---------------------------------------------------------------------------- security


def test_auth(server):
    with server.client(token=None) as anon:
        for method, path in [("GET", "/jobs"), ("GET", "/datasets"), ("POST", "/jobs")]:
            r = anon.request(method, path, json=SMALL if method == "POST" else None)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/health").status_code == 200
        assert anon.get("/openapi.json").status_code == 200
    with server.client(token="wrong") as bad:
        r = bad.get("/jobs")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    with server.client(token=None) as anon:
        # ?token= is for pictures and downloads only, not the JSON API
        assert anon.get("/datasets", params={"token": TOKEN}).status_code == 401


@pytest.mark.parametrize(
    "name",
    [
        "../outside/secret",
        "..%2Foutside%2Fsecret",
        "%2Fetc%2Fpasswd",
        "escape",
        "nested/%2E%2E/tiny",
    ],
)
def test_dataset_names_stay_inside_the_data_root(http, name):
    r = http.get(f"/datasets/{name}")
    assert r.status_code == 404, r.text
    r = http.post("/jobs", json={**SMALL, "dataset": name.replace("%2F", "/")})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "dataset"]
    assert http.delete(f"/datasets/{name}").status_code == 404


def test_absolute_dataset_path_refused(http, server):
    r = http.post("/jobs", json={**SMALL, "dataset": str(server.data_root / "tiny")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dataset"]


def test_body_size_limit(http):
    big = {**SMALL, "dataset": "x" * (BODY_LIMIT + 10)}
    assert http.post("/jobs", json=big).status_code == 413
    r = http.post("/jobs/abc/encode", json={"X": [[0.5] * 16] * 3000})
    assert r.status_code == 413
    payload = io.BytesIO()
    np.save(payload, np.zeros((UPLOAD_LIMIT // 8 + 100, 1)))
    r = http.post(
        "/datasets", data={"name": "toolarge"}, files={"file": ("big.npy", payload.getvalue())}
    )
    assert r.status_code == 413
    assert http.get("/datasets/toolarge").status_code == 404


# ---------------------------------------------------------------------------- datasets


def test_list_and_get_datasets(http):
    names = {d["name"]: d for d in http.get("/datasets").json()}
    assert {"tiny", "nested/tiny2", "wide"} <= set(names)
    assert "escape" not in names and "secret" not in names
    d = names["tiny"]
    assert d["shape"] == [200, 16] and d["chunks"] == [50, 16] and d["sample_shape"] == [4, 4]
    assert d["bytes"] == 200 * 16 * 8 and d["dtype"] == "float64"
    assert http.get("/datasets/nested/tiny2").json()["name"] == "nested/tiny2"


def _idx_bytes(a: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(np.uint8).tobytes()


def test_upload_npy_and_gzipped_idx_then_delete(http, server):
    from worker.dataset import read_all

    X = tiny_data(m=120, n=9, seed=4).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, X)
    r = http.post("/datasets", data={"name": "up/npy"}, files={"file": ("x.npy", buf.getvalue())})
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == [120, 9] and r.json()["compression"] == "none"  # floats: raw
    np.testing.assert_allclose(read_all(server.data_root / "up" / "npy"), X, rtol=1e-7)
    r = http.post(
        "/datasets",
        data={"name": "up/npyz", "compression": "zstd"},
        files={"file": ("x.npy", buf.getvalue())},
    )
    assert r.status_code == 201 and r.json()["compression"] == "zstd", r.text
    np.testing.assert_array_equal(read_all(server.data_root / "up" / "npyz"), X)
    r = http.post(
        "/datasets",
        data={"name": "up/npylz", "compression": "lz4"},
        files={"file": ("x.npy", buf.getvalue())},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "compression"
    assert http.get("/datasets/up/npylz").status_code == 404
    assert http.get("/datasets/up/npy").status_code == 200

    imgs = np.random.default_rng(0).integers(0, 256, size=(50, 5, 5))
    gz = gzip.compress(_idx_bytes(imgs))
    r = http.post("/datasets", data={"name": "up/idx"}, files={"file": ("x-idx3.gz", gz)})
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == [50, 25] and r.json()["compression"] == "zstd"  # uint8 pixels
    got = read_all(server.data_root / "up" / "idx")
    scale = r.json()["scale"]
    np.testing.assert_allclose(got, imgs.reshape(50, 25) * scale, rtol=1e-6)

    r = http.post("/datasets", data={"name": "up/npy"}, files={"file": ("x.npy", buf.getvalue())})
    assert r.status_code == 409
    gz_npy = gzip.compress(buf.getvalue())
    r = http.post("/datasets", data={"name": "up/npygz"}, files={"file": ("x.npy.gz", gz_npy)})
    assert r.status_code == 201, r.text
    np.testing.assert_array_equal(read_all(server.data_root / "up" / "npygz"), X)
    r = http.post("/datasets", data={"name": "up/npy/X/inner"}, files={"file": ("x.npy", gz_npy)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "name"
    r = http.post("/datasets", data={"name": "up/bad"}, files={"file": ("x.txt", b"hello")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "file"
    r = http.post("/datasets", data={"name": "../x"}, files={"file": ("x.npy", buf.getvalue())})
    assert r.status_code == 422

    assert http.delete("/datasets/up/npy").status_code == 204
    assert http.get("/datasets/up/npy").status_code == 404
    assert not (server.data_root / "up" / "npy").exists()


# ---------------------------------------------------------------------------- service


def test_health_metrics_and_pages(server, http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["embedded"] is True
    deadline = time.monotonic() + 60  # the embedded cluster starts in the background
    while h.get("scheduler") is None and time.monotonic() < deadline:
        time.sleep(0.2)
        h = http.get("/health").json()
    assert h["scheduler"].startswith("tcp://127.0.0.1:") and h["workers"] >= 1
    text = http.get("/metrics").text
    assert 'sae_jobs{status="succeeded"}' in text
    assert "sae_jobs_submitted_total" in text
    assert 'sae_http_requests_total{method="POST",route="/jobs",status="202"}' in text
    assert "<table" in http.get("/").text
    assert "filters" in http.get("/ui/jobs/abc").text
    assert http.get("/docs").status_code == 200
    assert os.path.exists(server.state_dir / "jobs.db")


def test_ingest_photograph_patches(http, server):
    body = {"name": "photos/p6", "patch_size": 6, "n_patches": 300, "seed": 1}
    r = http.post("/datasets/photographs", json=body)
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["shape"] == [300, 36] and d["sample_shape"] == [6, 6]
    from worker.dataset import read_all

    X = read_all(server.data_root / "photos" / "p6")
    assert X.shape == (300, 36) and 0.1 - 1e-9 <= X.min() and X.max() <= 0.9 + 1e-9
    assert http.post("/datasets/photographs", json=body).status_code == 409
    r = http.post("/datasets/photographs", json={**body, "name": "x", "patch_size": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "patch_size"
    assert d["compression"] == "none"  # normalised floats: raw by default
    r = http.post("/datasets/photographs", json={**body, "name": "photos/z", "compression": "zstd"})
    assert r.status_code == 201 and r.json()["compression"] == "zstd", r.text
    np.testing.assert_array_equal(read_all(server.data_root / "photos" / "z"), X)
    r = http.post("/datasets/photographs", json={**body, "name": "x", "compression": "gzip"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "compression"


def test_deep_job_shows_its_stages(http):
    spec = {"dataset": "tiny", "hidden": [6, 3], "max_iter": 4, "finetune_iter": 3, "seed": 2}
    job_id = submit(http, spec)
    stages = set()
    job = wait_job(http, job_id, lambda j: stages.add(j["stage"]) or j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    history = http.get(f"/jobs/{job_id}/history").json()
    assert {e["stage"] for e in history} == {"pretrain 1/2", "pretrain 2/2", "finetune"}
    # the status named the stages it went through (polling may miss a short one)
    assert stages & {"pretrain 1 of 2", "pretrain 2 of 2", "fine-tune"}
    assert job["stage"] == "fine-tune" and job["progress"] == 1.0
    X = tiny_data(m=4, seed=5)
    enc = http.post(f"/jobs/{job_id}/encode", json={"X": X.tolist()}).json()
    assert np.asarray(enc["hidden"]).shape == (4, 3)
    assert np.asarray(enc["reconstruction"]).shape == (4, 16)
    assert http.get(f"/jobs/{job_id}/filters.png").status_code == 200
    r = http.post("/jobs", json={**spec, "hidden": [6, 40]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hidden"]


def test_a_failing_job_reports_its_error(http, server):
    write_tiny(server.data_root, "broken", tiny_data(seed=7))
    blocker = submit(http, {**SMALL, "max_iter": 100000, "seed": 8, "optimizer": "gd"})
    wait_job(http, blocker, lambda j: j["status"] == "running")
    job_id = submit(http, {**SMALL, "dataset": "broken"})
    chunks = sorted((server.data_root / "broken" / "X").rglob("*"))
    victim = [p for p in chunks if p.is_file()][1]
    victim.unlink()  # the data go bad while the job waits in the queue
    assert http.post(f"/jobs/{blocker}/cancel").status_code == 200
    job = wait_job(http, job_id)
    assert job["status"] == "failed"
    assert "chunk 1" in job["error"], job["error"]
    # it failed before its first checkpoint: there is no model to give back
    assert http.get(f"/jobs/{job_id}/model.npz").status_code == 404


def test_topk_job_over_rest_and_its_bad_fields(http):
    spec = {"dataset": "tiny", "kind": "topk", "k": 2, "hidden": 8, "max_iter": 10, "seed": 1}
    job_id = http.post("/jobs", json=spec).json()["id"]
    job = wait_job(http, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    enc = http.post(f"/jobs/{job_id}/encode", json={"X": tiny_data(m=5, seed=9).tolist()}).json()
    hidden = np.asarray(enc["hidden"])
    assert hidden.shape == (5, 8) and np.count_nonzero(hidden, axis=1).max() <= 2
    for bad, field in [
        ({"k": 9}, "k"),
        ({"k": 0}, "k"),
        ({"rho": 0.1}, "rho"),
        ({"kind": "relu-l1", "k": None, "l1": -1}, "l1"),
        ({"kind": "sigmoid-kl", "k": None, "k_aux": 3}, "k_aux"),
        ({"init_model": "/etc/passwd"}, "init_model"),
    ]:
        r = http.post("/jobs", json={**spec, **bad})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field], r.text
        assert not r.json()["detail"][0]["msg"].startswith(field)


def test_a_validation_dataset_is_named_like_the_dataset(http):
    spec = {**SMALL, "optimizer": "adam", "batch_size": 50, "epochs": 1, "validate_every": 2}
    r = http.post("/jobs", json={**spec, "validation_dataset": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "validation_dataset"]
    r = http.post("/jobs", json={**spec, "validation_dataset": "/etc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "validation_dataset"]
    job_id = http.post("/jobs", json={**spec, "validation_dataset": "nested/tiny2"}).json()["id"]
    job = wait_job(http, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    history = http.get(f"/jobs/{job_id}/history").json()
    assert any("val_cost" in e for e in history)
    assert job["metrics"]["split"] == "validation dataset"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden": "5"}, "hidden"),
        ({"max_iter": True}, "max_iter"),
        ({"lam": "0.001"}, "lam"),
        ({"nesterov": "yes"}, "nesterov"),
        ({"hidden": [1] * 17}, "hidden"),
        ({"hidden": [1] * 1000}, "hidden"),
    ],
)
def test_specs_are_not_coerced_and_depth_is_bounded(http, change, field):
    """A string, a boolean or "yes" is not taken for a number or a flag; a thousand layers of
    one unit (a stage folder each) is refused before anything is written."""
    r = http.post("/jobs", json={**SMALL, **change})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field], r.text


def test_a_validation_dataset_in_use_cannot_be_deleted(http, server):
    write_tiny(server.data_root, "val/inuse")
    spec = {
        "dataset": "tiny",
        "hidden": 4,
        "optimizer": "adam",
        "batch_size": 10,
        "epochs": 100_000,
        "validation_dataset": "val/inuse",
    }
    job_id = http.post("/jobs", json=spec).json()["id"]
    try:
        wait_job(http, job_id, lambda j: j["status"] == "running" or j["status"] in TERMINAL)
        r = http.delete("/datasets/val/inuse")
        assert r.status_code == 409 and job_id in r.text, r.text
    finally:
        http.post(f"/jobs/{job_id}/cancel")
        wait_job(http, job_id, lambda j: j["status"] in TERMINAL)
    assert http.delete("/datasets/val/inuse").status_code == 204
