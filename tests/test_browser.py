"""The web page in real headless Chromium: the job list and a running job's page with its
live progress, cost curve and filter picture."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from tests.service_fixtures import Server, wait_job, write_tiny

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary (CI installs Debian's: apt-get install -y chromium)",
)
TOKEN = "browser-token"


def chromium(url: str, profile, *args: str, budget_ms: int = 6000) -> str:
    """Load ``url`` headless, let its scripts run, return the rendered DOM."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        *(args or ["--dump-dom"]),
        url,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out.decode()


def _pixels_near(png, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels of a screenshot are within ``tol`` of the colour ``rgb``."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    return int(np.sum(np.all(np.abs(a - np.array(rgb)) <= tol, axis=-1)))


def _text(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"no element #{element_id} in the page"
    return m.group(1).strip()


def test_job_page_shows_a_running_job(tmp_path):
    write_tiny(tmp_path / "data", "tiny")
    with Server(tmp_path / "data", tmp_path / "state", token=TOKEN) as srv, srv.client() as http:
        # gradient descent: far from converged for the whole test
        spec = {"dataset": "tiny", "hidden": 9, "max_iter": 100000, "seed": 4, "optimizer": "gd"}
        job_id = http.post("/jobs", json=spec).json()["id"]
        wait_job(http, job_id, lambda j: j["status"] == "running" and j["iteration"] >= 2)

        dom = chromium(f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}", tmp_path / "profile")
        assert _text(dom, "job-id") == job_id
        assert _text(dom, "status") == "running"
        assert int(_text(dom, "iteration")) >= 2
        assert _text(dom, "max-iter") == "100000"
        assert re.fullmatch(r"\d+\.\d%", _text(dom, "progress"))
        assert _text(dom, "cost") not in ("", "–")
        # the filter picture loaded (the page writes its natural size into the DOM)
        m = re.search(r'<img[^>]*id="filters"[^>]*>', dom)
        assert m, dom[-2000:]
        width = re.search(r'data-natural-width="(\d+)"', m.group(0))
        assert width and int(width.group(1)) > 0, m.group(0)
        # the cost, gradient-norm and samples/s plots are drawn by BokehJS from the history
        curve = re.search(r'<div[^>]*id="curve"[^>]*>', dom)
        assert curve, dom[-2000:]
        assert 'data-rendered="true"' in curve.group(0) and 'data-scale="log"' in curve.group(0)
        assert int(re.search(r'data-points="(\d+)"', curve.group(0)).group(1)) >= 2
        assert 'data-stages="training"' in curve.group(0)
        assert _text(dom, "evaluations") not in ("", "–")
        assert re.fullmatch(r"[\d.e+]+", _text(dom, "samples-per-second")), dom[-3000:]
        # the Dask dashboard is linked
        assert re.search(r'id="dashboard" href="http://[^"#]+"', dom)

        index = chromium(f"{srv.url}/?token={TOKEN}", tmp_path / "profile2", budget_ms=3000)
        assert f'data-job="{job_id}" data-status="running"' in index
        assert 'href="/ui/jobs/' + job_id in index

        shot = tmp_path / "job.png"
        chromium(
            f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}",
            tmp_path / "profile3",
            f"--screenshot={shot}",
            "--window-size=1100,2000",
        )
        assert _pixels_near(shot, (0x1F, 0x77, 0xB4)) > 100  # the plots' lines were painted
        assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_long_history_and_a_deleted_job(tmp_path):
    write_tiny(tmp_path / "data", "tiny")
    with Server(tmp_path / "data", tmp_path / "state", token=TOKEN) as srv, srv.client() as http:
        spec = {"dataset": "tiny", "hidden": 4, "max_iter": 3}
        job_id = http.post("/jobs", json=spec).json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        # a history far longer than Math.min(...array) can take as arguments
        n = 300_000
        entries = ",".join(
            f'{{"iteration":{i},"cost":{1.0 + 1.0 / (i + 1)},"val_cost":{1.1 + 1.0 / (i + 1)}}}'
            for i in range(n)
        )
        (srv.state_dir / "jobs" / job_id / "history.json").write_text(f"[{entries}]")
        dom = chromium(f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}", tmp_path / "profile")
        curve = re.search(r'<div[^>]*id="curve"[^>]*>', dom)
        assert curve, dom[-2000:]
        assert f'data-points="{n}"' in curve.group(0)
        drawn = int(re.search(r'data-drawn="(\d+)"', curve.group(0)).group(1))
        assert 2 <= drawn <= 1001
        assert 'data-rendered="true"' in curve.group(0) and _text(dom, "error") == ""
        assert 'data-validation="true"' in curve.group(0)  # a dashed validation line too
        # a held-out cost at every entry: thinned like the training curve, not 300,000 dots
        shown = int(re.search(r'data-validation-points="(\d+)"', curve.group(0)).group(1))
        assert 2 <= shown <= 1001, shown

        # a job that does not exist (or was deleted): the page says so and stops polling
        assert http.delete(f"/jobs/{job_id}").status_code == 204
        dom = chromium(f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}", tmp_path / "profile2")
        assert 'data-status="gone"' in dom
        assert "gone" in _text(dom, "error")


def test_api_docs_render_offline(tmp_path):
    """Swagger UI comes from the installed package (fastapi-offline), not a CDN: on a machine
    without internet access the docs page still lists the operations."""
    write_tiny(tmp_path / "data", "tiny")
    with Server(tmp_path / "data", tmp_path / "state") as srv:
        dom = chromium(f"{srv.url}/docs", tmp_path / "profile", budget_ms=8000)
        assert "cdn.jsdelivr.net" not in dom
        ops = re.findall(r'class="opblock opblock-(get|post|delete)', dom)
        assert len(ops) >= 10, dom[-2000:]
        assert "/jobs/{job_id}/encode" in dom
        redoc = chromium(f"{srv.url}/redoc", tmp_path / "profile2", budget_ms=8000)
        assert "/jobs/{job_id}/encode" in redoc, redoc[-2000:]


def test_pages_fit_the_window_and_say_what_they_count(tmp_path):
    """A 196-unit filter picture (1,628 px) is scaled to a 1,280 px window and enlarges on
    click; the spec is a table; a deep job's iteration is per stage and its progress overall,
    and its plots have a line per stage; ?scale=linear draws linear axes; the job list keeps
    one clock (UTC)."""
    import numpy as np
    from PIL import Image

    write_tiny(tmp_path / "data", "tiny")
    with Server(tmp_path / "data", tmp_path / "state", token=TOKEN) as srv, srv.client() as http:
        spec = {"dataset": "tiny", "hidden": [6, 3], "max_iter": 3, "finetune_iter": 3}
        job_id = http.post("/jobs", json=spec).json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        big = np.random.default_rng(0).integers(0, 255, (1628, 1628), dtype=np.uint8)
        Image.fromarray(big).save(srv.state_dir / "jobs" / job_id / "filters.png")
        url = f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}"
        dom = chromium(url, tmp_path / "p1", "--window-size=1280,900", "--dump-dom")
        img = re.search(r'<img[^>]*id="filters"[^>]*>', dom).group(0)
        assert 'data-natural-width="1628"' in img, img
        shown = int(re.search(r'data-shown-width="(\d+)"', img).group(1))
        assert 200 <= shown <= 1280 - 64, img  # inside the page's margins
        assert re.search(r'<tr data-field="hidden"><th>hidden</th><td>6, 3</td></tr>', dom)
        assert _text(dom, "iteration-label") == "Iteration in this stage"
        assert _text(dom, "progress-label") == "Progress of all stages"
        curve = re.search(r'<div[^>]*id="curve"[^>]*>', dom).group(0)
        stages = re.search(r'data-stages="([^"]*)"', curve).group(1).split("|")
        assert len(stages) == 3 and stages[-1] != stages[0], stages  # 2 pretraining + fine-tune
        assert 'data-rendered="true"' in curve
        linear = chromium(url + "&scale=linear", tmp_path / "p3", "--dump-dom")
        assert 'data-scale="linear"' in linear and 'data-rendered="true"' in linear
        index = chromium(f"{srv.url}/?token={TOKEN}", tmp_path / "p2", budget_ms=3000)
        updated = _text(index, "updated")
        assert re.search(r"updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$", updated), updated


def test_job_page_shows_the_metrics(tmp_path):
    """A finished job's page shows its final model's metrics as a table and its
    feature-density picture; before metrics.json is written it says it has none."""
    from worker import layout
    from worker.evaluate import evaluate_job

    write_tiny(tmp_path / "data", "tiny")
    with Server(tmp_path / "data", tmp_path / "state", token=TOKEN) as srv, srv.client() as http:
        spec = {"dataset": "tiny", "hidden": 4, "max_iter": 3}
        job_id = http.post("/jobs", json=spec).json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        root = srv.state_dir / "jobs" / job_id
        for name in (layout.METRICS, layout.DENSITY):
            (root / name).unlink(missing_ok=True)
        url = f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}"
        dom = chromium(url, tmp_path / "p1")
        assert re.search(r'<table id="metrics"[^>]*hidden', dom), dom[-3000:]
        assert re.search(r'<span id="metrics-none">', dom)  # shown: no hidden attribute
        assert re.search(r'<figure id="density-figure"[^>]*hidden', dom)

        metrics = evaluate_job(root)
        dom = chromium(url, tmp_path / "p2")
        table = re.search(r'<table id="metrics"([^>]*)>(.*?)</table>', dom, re.S)
        assert table and "hidden" not in table.group(1), dom[-3000:]
        rows = dict(
            re.findall(r'<tr data-metric="([a-z_0-9]+)"><th>[^<]*</th><td>([^<]*)</td>', table[2])
        )
        assert list(rows) == [
            "examples", "mse", "fvu", "explained_variance", "l0", "dead", "cosine", "shrinkage",
            "active",
        ]  # fmt: skip
        assert rows["examples"] == "200 (all chunks)"
        for k in ("mse", "fvu", "explained_variance", "cosine", "shrinkage"):
            assert abs(float(rows[k]) / metrics[k] - 1) < 1e-3, (k, rows[k], metrics[k])
        assert rows["l0"].endswith(" of 4")
        assert abs(float(rows["l0"].split()[0]) - metrics["l0"]) < 1e-3
        assert rows["dead"].startswith(f"{metrics['dead']} (")
        assert rows["active"] == "a &gt; 0.1"
        assert re.search(r'<span id="metrics-none" hidden', dom)
        figure = re.search(r'<figure id="density-figure"([^>]*)>', dom)
        assert "hidden" not in figure.group(1)
        img = re.search(r'<img[^>]*id="density"[^>]*>', dom).group(0)
        width = re.search(r'data-natural-width="(\d+)"', img)
        assert width and int(width.group(1)) > 0, img
        assert re.search(rf'id="metrics-link" href="/jobs/{job_id}/metrics.json\?token=', dom)


def test_a_stochastic_jobs_page_plots_steps_and_validation_and_folds_default_fields(tmp_path):
    """An Adam job with held-out chunks: the cost plot's x axis is the step (not the entry
    number), every validation point is drawn although few entries carry one, the legend says
    training and validation, and the spec shows the given fields first, the others (at their
    defaults) behind a button."""
    write_tiny(tmp_path / "data", "tiny")  # 200 rows in chunks of 50
    with Server(tmp_path / "data", tmp_path / "state", token=TOKEN) as srv, srv.client() as http:
        spec = {
            "dataset": "tiny",
            "hidden": 4,
            "optimizer": "adam",
            "batch_size": 25,
            "epochs": 3,
            "log_every": 2,
            "validate_every": 3,
            "validation_fraction": 0.25,
        }
        job_id = http.post("/jobs", json=spec).json()["id"]
        assert wait_job(http, job_id)["status"] == "succeeded"
        history = http.get(f"/jobs/{job_id}/history").json()
        with_val = [e for e in history if "val_cost" in e]
        assert 0 < len(with_val) < len(history)
        dom = chromium(f"{srv.url}/ui/jobs/{job_id}?token={TOKEN}", tmp_path / "p1")
        curve = re.search(r'<div[^>]*id="curve"[^>]*>', dom).group(0)
        assert 'data-rendered="true"' in curve and 'data-validation="true"' in curve
        assert f'data-last-x="{history[-1]["iteration"]}"' in curve, curve
        assert f'data-validation-points="{len(with_val)}"' in curve, curve
        for given in ("optimizer", "batch_size", "validation_fraction", "dataset"):
            assert re.search(rf'<tr data-field="{given}"><th>', dom), given
        for default in ("alpha", "momentum", "max_iter", "rho"):
            assert re.search(rf'<tr data-field="{default}" class="default">', dom), default
        button = re.search(r'<button id="spec-all"[^>]*>([^<]*)</button>', dom)
        assert button and "hidden" not in button.group(0) and "at their defaults" in button[1]
        assert _text(dom, "stage") == "one stage"
