"""What got in a new user's way (issue 10, first list): each test failed before its fix.

Errors that name their field once, progress in percent, checks before a cluster starts, a busy
port said in one line, /health and /metrics that describe the embedded cluster and every route,
and an access log without the page's polling.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest
from click.testing import CliRunner

from service.cli import main as sae
from service.errors import clean_message, describe_errors
from tests.service_fixtures import SAE, Server, child_env, wait_job, write_tiny

SMALL = {"dataset": "p", "hidden": 4, "max_iter": 3, "lam": 1e-4, "rho": 0.1, "beta": 0.5}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("usability")
    write_tiny(base / "data", "p")
    # log level info: uvicorn writes its access log (the polling filter is under test)
    with Server(base / "data", base / "state", args=["--log-level", "info"]) as s:
        yield s


# ------------------------------------------------------------------ errors name a field once


def test_clean_message_strips_repeated_field_and_pydantic_prefixes():
    assert clean_message("dataset", "dataset: dataset: no dataset named 'x'") == (
        "no dataset named 'x'"
    )
    assert clean_message("hidden", "Value error, hidden: layer sizes must be >= 1, got 0") == (
        "layer sizes must be >= 1, got 0"
    )
    assert clean_message("max_iter", "max-iter: too big") == "too big"
    assert clean_message("rho", "Input should be less than 1") == "Input should be less than 1"
    errors = [{"loc": ("body", "hidden", 1), "msg": "Value error, hidden: must be >= 1"}]
    assert describe_errors(errors) == "hidden.1: must be >= 1"
    union = [  # pydantic's errors for each branch of `int | list[int]`
        {"loc": ("body", "hidden", "int"), "msg": "Input should be a valid integer"},
        {"loc": ("body", "hidden", "list[int]"), "msg": "Input should be a valid list"},
    ]
    assert describe_errors(union) == (
        "hidden: Input should be a valid integer, or Input should be a valid list"
    )


def test_submit_on_a_missing_dataset_names_the_field_once(srv, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SMALL, "dataset": "nope"}))
    res = CliRunner().invoke(sae, ["submit", str(spec), "--url", srv.url])
    assert res.exit_code == 1
    assert "Error: 422: dataset: no dataset named 'nope'" in res.output, res.output
    assert res.output.count("dataset:") == 1
    with srv.client() as http:
        r = http.post("/jobs", json={**SMALL, "hidden": [25, 0]})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"][:2] == ["body", "hidden"]
    assert "Value error" not in err["msg"] and not err["msg"].startswith("hidden")


def test_train_cli_error_names_the_field_once(tmp_path):
    write_tiny(tmp_path, "p")
    res = CliRunner().invoke(sae, ["train", str(tmp_path / "p"), "--hidden", "25,0"])
    assert res.exit_code == 1
    assert "Value error" not in res.output, res.output
    assert re.search(r"hidden: layer sizes must be >= 1, got 0", res.output), res.output
    assert res.output.count("hidden") == 1, res.output


# ------------------------------------------------------------------ checks before the cluster


def test_train_on_a_missing_dataset_fails_before_any_cluster(tmp_path):
    res = CliRunner().invoke(sae, ["train", str(tmp_path / "nope"), "--hidden", "4"])
    assert res.exit_code == 1
    assert "Dashboard" not in res.output and "http://" not in res.output, res.output
    assert "nope" in res.output


def test_serve_on_a_busy_port_says_so_before_starting_dask(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run(
            [*SAE, "serve", "--data-root", str(tmp_path / "d"), "--state-dir", str(tmp_path / "s")]
            + ["--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert f"port: cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "distributed" not in proc.stderr and "dashboard" not in proc.stderr.lower()
    print(f"busy port reported after {elapsed:.1f} s")


# ------------------------------------------------------------------ progress in percent


def test_wait_shows_percent_not_permille(srv):
    with srv.client() as http:
        job_id = http.post("/jobs", json=SMALL).json()["id"]
    res = CliRunner().invoke(sae, ["wait", job_id, "--interval", "0.2", "--url", srv.url])
    assert res.exit_code == 0, res.output
    assert "‰" not in res.output and "/s" not in res.output, res.output
    assert re.search(r"100\.0%\|", res.output), res.output


# ------------------------------------------------------------------ /health and /metrics


def test_health_describes_the_embedded_cluster(srv):
    with srv.client() as http:
        wait_job(http, http.post("/jobs", json={**SMALL, "seed": 3}).json()["id"])
        h = http.get("/health").json()
    assert h["embedded"] is True
    assert h["scheduler"].startswith("tcp://127.0.0.1:"), h
    assert h["workers"] == 1 and h["threads"] == 1, h  # the fixture's --workers 1
    assert h["memory_limit_bytes"] > 0


def test_metrics_label_every_route_and_time_requests(srv):
    with srv.client() as http:
        for path in ("/docs", "/openapi.json", "/static/app.js", "/jobs", "/no-such-page"):
            http.get(path)
        text = http.get("/metrics").text
    for route in ("/docs", "/openapi.json", "/static", "/jobs"):
        assert f'route="{route}"' in text, route
    assert re.search(r'sae_http_requests_total\{method="GET",route="unmatched",status="404"', text)
    assert 'route="unmatched",status="200"' not in text
    latency = r'sae_http_request_duration_seconds_bucket\{handler="/jobs"'
    assert re.search(latency, text), text[:2000]


# ------------------------------------------------------------------ access log


def test_access_log_leaves_out_polling(srv):
    with srv.client() as http:
        job_id = http.post("/jobs", json={**SMALL, "seed": 4}).json()["id"]
        for _ in range(5):
            http.get(f"/jobs/{job_id}")
            http.get(f"/jobs/{job_id}/history")
            http.get("/jobs?limit=100")
        http.get(f"/jobs/{job_id}/nothing-here")
        wait_job(http, job_id)
    time.sleep(0.5)
    log = srv.log.read_text()
    assert re.search(r'"POST /jobs HTTP/1\.1" 202', log), log[-2000:]
    assert 'nothing-here HTTP/1.1" 404' in log
    assert not re.search(rf'"GET /jobs/{job_id} HTTP/1\.1" 200', log)
    assert not re.search(r'"GET /jobs\?limit=100 HTTP/1\.1" 200', log)
    assert f"/jobs/{job_id}/history" not in log


# ------------------------------------------------------------------ uploads


def _npy(a) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def test_upload_names_its_file_and_takes_a_sample_shape(srv):
    import numpy as np

    X = np.random.default_rng(0).random((20, 16))
    with srv.client() as http:
        r = http.post(
            "/datasets",
            data={"name": "up1", "sample_shape": "4x4"},
            files={"file": ("digits.npy", _npy(X))},
        )
        assert r.status_code == 201, r.text
        d = r.json()
        assert d["source"] == "upload:digits.npy (npy)", d
        assert ".upload" not in d["source"]
        assert d["sample_shape"] == [4, 4]
        # a shape that does not hold one example's 16 values names the field
        r = http.post(
            "/datasets",
            data={"name": "up2", "sample_shape": "5x5"},
            files={"file": ("digits.npy", _npy(X))},
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "sample_shape"]
        msg = r.json()["detail"][0]["msg"]
        assert msg == "5x5 makes 25 values, but each example of the upload has 16 features", msg
        r = http.post(
            "/datasets",
            data={"name": "up3", "sample_shape": "4 by 4"},
            files={"file": ("digits.npy", _npy(X))},
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sample_shape"]
        assert http.get("/datasets/up2").status_code == 404


# ------------------------------------------------------------------ artifacts and continuation


def _model(http, job_id):
    import io

    import numpy as np

    r = http.get(f"/jobs/{job_id}/model.npz")
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as z:
        return {k: z[k] for k in z.files if k != "spec"}, r.headers.get("X-SAE-Partial")


def test_resume_extends_a_finished_job_on_the_uninterrupted_trajectory(srv):
    import numpy as np

    spec = {**SMALL, "seed": 7}
    with srv.client() as http:
        job_id = http.post("/jobs", json=spec).json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        # nothing to do, or a max_iter below what it ran: refused, naming why
        r = http.post(f"/jobs/{job_id}/resume")
        assert r.status_code == 409 and "finished at iteration 3" in r.json()["detail"], r.text
        r = http.post(f"/jobs/{job_id}/resume", json={"max_iter": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_iter"]
        assert http.post("/jobs/0123456789abcdef/resume").status_code == 404
    with srv.client() as http:  # queued again: 3 of 6 iterations done
        r = http.post(f"/jobs/{job_id}/resume", json={"max_iter": 6})
        assert r.status_code == 202 and r.json()["progress"] == 0.5, r.text
    res = CliRunner().invoke(sae, ["wait", job_id, "--interval", "0.2", "--url", srv.url])
    assert res.exit_code == 0, res.output
    with srv.client() as http:
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["iteration"] == 6 and job["max_iter"] == 6
        assert job["spec"]["max_iter"] == 6
        history = http.get(f"/jobs/{job_id}/history").json()
        straight = http.post("/jobs", json={**spec, "max_iter": 6}).json()["id"]
        assert wait_job(http, straight)["status"] == "succeeded"
        ref = http.get(f"/jobs/{straight}/history").json()
        assert [e["iteration"] for e in history] == list(range(7))
        assert [e["cost"] for e in history] == [e["cost"] for e in ref]
        (ext, partial), (st, _) = _model(http, job_id), _model(http, straight)
        assert partial is None
        assert all(np.array_equal(ext[k], st[k]) for k in ("W1", "b1", "W2", "b2"))


def test_a_cancelled_job_gives_its_checkpoint_back_and_resumes(srv, tmp_path):
    spec = {**SMALL, "max_iter": 100000, "optimizer": "gd", "seed": 8}
    with srv.client() as http:
        job_id = http.post("/jobs", json=spec).json()["id"]
        wait_job(http, job_id, lambda j: j["status"] == "running" and j["iteration"] >= 2)
        assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        wait_job(http, job_id)
        # the job's record catches up with its last checkpoint (a few iterations can run
        # between the cancel and the optimizer seeing it)
        deadline = time.monotonic() + 30
        while True:
            last = http.get(f"/jobs/{job_id}/history").json()[-1]["iteration"]
            if http.get(f"/jobs/{job_id}").json()["iteration"] == last:
                break
            assert time.monotonic() < deadline, "the job's iteration never reached its history"
            time.sleep(0.2)
        model, partial = _model(http, job_id)
        assert partial == "true" and model["W1"].shape == (4, 16)
        res = CliRunner().invoke(sae, ["download", job_id, str(tmp_path / "d"), "--url", srv.url])
        assert res.exit_code == 0 and "partial" in res.output, res.output
        stopped_at = http.get(f"/jobs/{job_id}").json()["iteration"]
        r = http.post(f"/jobs/{job_id}/resume")
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running"), r.text
        assert http.post(f"/jobs/{job_id}/resume").status_code == 409  # not finished yet
        job = wait_job(http, job_id, lambda j: j["iteration"] >= stopped_at + 2)
        assert job["status"] == "running"
        hist = http.get(f"/jobs/{job_id}/history").json()
        assert [e["iteration"] for e in hist] == list(range(len(hist)))  # one trajectory
        assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_metrics_show_a_running_job_and_the_cluster(srv):
    spec = {**SMALL, "max_iter": 100000, "optimizer": "gd", "seed": 9}
    with srv.client() as http:
        job_id = http.post("/jobs", json=spec).json()["id"]
        try:
            wait_job(http, job_id, lambda j: j["status"] == "running" and j["iteration"] >= 3)
            text = http.get("/metrics").text
        finally:
            http.post(f"/jobs/{job_id}/cancel")

    def value(name: str) -> float:
        m = re.search(rf'^{name}\{{job="{job_id}"\}} (\S+)$', text, re.M)
        assert m, f"{name} for {job_id} missing"
        return float(m.group(1))

    assert value("sae_job_iteration") >= 2
    assert value("sae_job_evaluations") >= 2
    assert value("sae_job_iteration_seconds") > 0
    assert value("sae_job_samples_per_second") > 0
    assert value("sae_job_cost") > 0
    assert re.search(r"^sae_cluster_workers 1\.0$", text, re.M)
    assert re.search(r"^sae_cluster_threads 1\.0$", text, re.M)


# ------------------------------------------------------------------ the Python client


def test_python_client_runs_a_job_end_to_end(srv, tmp_path):
    import numpy as np

    from service.client import Client, ServiceError
    from worker.spec import TrainSpec

    X = np.random.default_rng(3).random((30, 16))
    np.save(tmp_path / "rows.npy", X)
    with Client(srv.url) as sae_api:
        assert sae_api.health()["status"] == "ok"
        d = sae_api.upload("client-up", tmp_path / "rows.npy", sample_shape=(4, 4))
        assert d["sample_shape"] == [4, 4]
        assert "client-up" in [x["name"] for x in sae_api.datasets()]
        job = sae_api.submit(TrainSpec(dataset="p", hidden=4, max_iter=3, seed=11))
        seen: list[int] = []
        job = sae_api.wait(job["id"], interval=0.1, on_update=lambda j: seen.append(j["iteration"]))
        assert job["status"] == "succeeded" and seen[-1] == 3
        assert [e["iteration"] for e in sae_api.history(job["id"])] == [0, 1, 2, 3]
        files = sae_api.download(job["id"], tmp_path / "out")
        assert set(files) == {"model.npz", "history.json", "filters.png", "cost.png"}
        assert not any(f["partial"] for f in files.values())
        hidden, recon = sae_api.encode(job["id"], X[:5])
        assert hidden.shape == (5, 4) and recon.shape == (5, 16)
        assert job["id"] in [j["id"] for j in sae_api.jobs(["succeeded"], limit=100)["items"]]
        with pytest.raises(ServiceError) as err:
            sae_api.submit({**SMALL, "dataset": "nope"})
        assert err.value.status == 422 and str(err.value) == "422: dataset: no dataset named 'nope'"
        with pytest.raises(ServiceError) as err:
            sae_api.resume(job["id"])
        assert err.value.status == 409
        sae_api.delete(job["id"])
        with pytest.raises(ServiceError) as err:
            sae_api.job(job["id"])
        assert err.value.status == 404
    with Client("http://127.0.0.1:9") as nobody, pytest.raises(ServiceError) as err:
        nobody.health()
    assert err.value.status == 0 and "cannot reach" in err.value.message


# ------------------------------------------------------------------ minibatch jobs over REST


def test_adam_job_over_rest_counts_steps(srv):
    """A stochastic job: POST /jobs takes its fields, the status counts steps of the whole
    schedule, history entries carry epochs and samples; bad fields are 422s naming them."""
    spec = {
        "dataset": "p",
        "hidden": 3,
        "optimizer": "adam",
        "batch_size": 40,
        "epochs": 3,
        "log_every": 1,
        "learning_rate": 0.05,
    }
    with srv.client() as http:
        r = http.post("/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = http.get(f"/jobs/{r.json()['id']}").json()
        assert job["max_iter"] == 15  # 3 epochs of 200 rows / 40
        job = wait_job(http, job["id"])
        assert job["status"] == "succeeded" and job["iteration"] == 15, job
        assert job["progress"] == 1.0
        hist = http.get(f"/jobs/{job['id']}/history").json()
        assert [e["iteration"] for e in hist] == list(range(1, 16))
        assert hist[-1]["epoch"] == 2 and hist[-1]["samples"] == 600
        for body, field in (
            ({**spec, "batch_size": 500}, "batch_size"),  # larger than the dataset
            ({**spec, "batch_size": 0}, "batch_size"),
            ({**spec, "learning_rate": -1}, "learning_rate"),
            ({**spec, "lr_schedule": "exponential"}, "lr_schedule"),
        ):
            r = http.post("/jobs", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["detail"][0]["loc"][-1] == field, r.text
        r = http.post(f"/jobs/{job['id']}/resume", json={"max_iter": 50})
        assert r.status_code == 422 and "epochs" in r.text
