"""The training loop (worker.train) and the `sae train` / `sae gradcheck` commands."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sae import objective as obj
from sae.optimize import OptimizerState
from worker.dataset import ChunkError, write_dataset
from worker.layout import load_model
from worker.schedule import build_network
from worker.spec import TrainSpec
from worker.train import train


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> tuple[str, np.ndarray]:
    X = np.random.default_rng(0).random((1200, 36)) * 0.8 + 0.1
    path = tmp_path_factory.mktemp("ds") / "patches"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=150, sample_shape=(6, 6))
    return str(path), X


def _spec(path: str, **kw) -> TrainSpec:
    base = dict(dataset=path, hidden=9, lam=1e-4, rho=0.05, beta=3.0, max_iter=12, seed=3)
    base.update(kw)
    return TrainSpec(**base)


#: The distributed plan with one task per chunk (the engine would run this small data as
#: one task).
PER_CHUNK = {"single_task": False}


def _theta(out: Path) -> np.ndarray:
    return load_model(out / "model.npz")[1]


@pytest.mark.parametrize("plan", ["local", "distributed"])
def test_train_outputs_and_history(two_workers, patches, tmp_path, plan):
    path, X = patches
    seen = []
    out = tmp_path / plan
    res = train(
        _spec(path),
        out,
        client=two_workers,
        execution=plan,
        engine_options=PER_CHUNK,
        on_iteration=seen.append,
    )
    assert res.status == "succeeded" and res.execution == plan
    hist = json.loads((out / "history.json").read_text())
    assert isinstance(hist, list) and hist[0]["iteration"] == 0
    assert [e["iteration"] for e in hist] == list(range(len(hist)))
    assert len(hist) == 13 == res.iterations + 1
    for e in hist:
        assert set(e) >= {"iteration", "cost", "grad_norm", "evaluations", "seconds"}
    evals = [e["evaluations"] for e in hist]
    secs = [e["seconds"] for e in hist]
    assert evals[0] == 1 and evals == sorted(evals) and evals[-1] == res.evaluations
    assert secs == sorted(secs)
    assert [e["iteration"] for e in seen] == [e["iteration"] for e in hist]
    # model.npz holds the arrays and a spec with the network; its cost is the history's.
    net, theta, meta = load_model(out / "model.npz")
    with np.load(out / "model.npz") as npz:
        assert {"W1", "b1", "W2", "b2", "spec"} <= set(npz.files)
        assert npz["W1"].shape == (9, 36) and npz["b2"].shape == (36,)
    assert meta["network"]["activations"] == ["sigmoid", "sigmoid"]
    assert meta["spec"]["hidden"] == 9
    J, g = obj.cost(net, theta, X)
    assert abs(J - hist[-1]["cost"]) <= 1e-12 * J
    assert abs(np.linalg.norm(g) - hist[-1]["grad_norm"]) <= 1e-9 * np.linalg.norm(g)
    assert hist[0]["cost"] > hist[-1]["cost"]
    for name in ("filters.png", "cost.png", "state.npz", "job.json"):
        assert (out / name).stat().st_size > 0
    job = json.loads((out / "job.json").read_text())
    assert job["execution"] == [plan] and job["dashboard"].startswith("http")
    assert OptimizerState.load(out / "state.npz").iteration == 12


@pytest.mark.bitwise
def test_local_and_distributed_plans_agree_bitwise(two_workers, patches, tmp_path):
    path, _ = patches
    spec = _spec(path, max_iter=8, passes="fused")
    train(spec, tmp_path / "a", client=two_workers, execution="local")
    train(
        spec, tmp_path / "b", client=two_workers, execution="distributed", engine_options=PER_CHUNK
    )
    assert np.array_equal(_theta(tmp_path / "a"), _theta(tmp_path / "b"))


def test_max_iter_zero_writes_initial_parameters(two_workers, patches, tmp_path):
    path, _ = patches
    spec = _spec(path, max_iter=0)
    res = train(spec, tmp_path / "z", client=two_workers)
    net = build_network(spec, 36)
    assert np.array_equal(_theta(tmp_path / "z"), net.init_theta(3))
    hist = json.loads((tmp_path / "z" / "history.json").read_text())
    assert [e["iteration"] for e in hist] == [0] and res.iterations == 0


@pytest.mark.bitwise
@pytest.mark.parametrize("plan", ["local", "distributed"])
def test_cancel_then_resume_is_bitwise_uninterrupted(two_workers, patches, tmp_path, plan):
    path, _ = patches
    # The local plan's task learns about a stop request from this process's polling: give
    # it enough iterations to still be running then.
    n = 15 if plan == "distributed" else 300
    spec = _spec(path, max_iter=n)
    train(spec, tmp_path / "full", client=two_workers, execution=plan, engine_options=PER_CHUNK)
    out = tmp_path / "cut"
    seen: list[dict] = []

    def stop() -> bool:
        return bool(seen) and seen[-1]["iteration"] >= 5

    res = train(
        spec,
        out,
        client=two_workers,
        execution=plan,
        engine_options=PER_CHUNK,
        on_iteration=seen.append,
        should_stop=stop,
    )
    assert res.status == "cancelled"
    done = OptimizerState.load(out / "state.npz").iteration
    assert 5 <= done < n
    hist = json.loads((out / "history.json").read_text())
    assert hist[-1]["iteration"] == done
    res2 = train(
        spec, out, client=two_workers, execution=plan, engine_options=PER_CHUNK, resume=True
    )
    assert res2.status == "succeeded" and res2.iterations == n
    assert np.array_equal(_theta(out), _theta(tmp_path / "full"))
    hist = json.loads((out / "history.json").read_text())
    assert [e["iteration"] for e in hist] == list(range(n + 1))
    assert hist[-1]["seconds"] >= hist[done]["seconds"]


@pytest.mark.bitwise
@pytest.mark.parametrize("plan", ["local", "distributed"])
def test_worker_killed_during_job(patches, tmp_path, plan):
    """On a cluster of its own (the session's workers are not the ones killed: in CI, after
    the whole suite, a nanny once did not bring a killed worker back within 60 s, which then
    failed every later test's fixture; the property checked here does not need it back)."""
    from worker.cluster import get_client

    with get_client(workers=2, threads_per_worker=1, memory_limit="1GB") as (client, _):
        _killed_during_job(client, patches, tmp_path, plan)


def _killed_during_job(two_workers, patches, tmp_path, plan):
    path, _ = patches
    n = 10 if plan == "distributed" else 120  # the local task must still run at iteration 3
    spec = _spec(path, max_iter=n)
    train(spec, tmp_path / "ref", client=two_workers, execution=plan, engine_options=PER_CHUNK)
    pids = two_workers.run(os.getpid)
    killed = []

    def on_iteration(e: dict) -> None:
        if e["iteration"] == 3 and not killed:
            victim = sorted(pids)[0]
            if plan == "local":  # the worker running the job's task
                busy = two_workers.processing()
                victim = next((w for w, keys in busy.items() if keys), None)
            if victim is not None:
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

    res = train(
        spec,
        tmp_path / "hit",
        client=two_workers,
        execution=plan,
        engine_options=PER_CHUNK,
        on_iteration=on_iteration,
    )
    assert killed and res.status == "succeeded" and res.iterations == n
    assert np.array_equal(_theta(tmp_path / "hit"), _theta(tmp_path / "ref"))


def test_sigmoid_output_on_data_outside_unit_range(two_workers, tmp_path):
    X = np.random.default_rng(1).normal(size=(200, 16))
    path = tmp_path / "white"
    vr = [float(X.min()), float(X.max())]
    write_dataset(path, X, *X.shape, dtype="float64", preprocessing={"value_range": vr})
    with pytest.raises(ValueError, match="output_activation"):
        train(_spec(str(path), hidden=4), tmp_path / "o", client=two_workers)
    res = train(
        _spec(str(path), hidden=4, output_activation="linear", max_iter=3),
        tmp_path / "o",
        client=two_workers,
    )
    assert res.status == "succeeded"


def test_bad_chunk_fails_the_job_naming_it(two_workers, tmp_path):
    X = np.random.default_rng(2).random((400, 16))
    path = tmp_path / "holes"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100)
    (path / "X" / "c" / "2" / "0").unlink()
    for plan in ("local", "distributed"):
        with pytest.raises(ChunkError, match="chunk 2 "):
            train(
                _spec(str(path), hidden=4),
                tmp_path / plan,
                client=two_workers,
                execution=plan,
                engine_options=PER_CHUNK,
            )


# ------------------------------------------------------------------------------- the CLI


def _cli():
    from service.cli import main

    return main


def test_cli_train_resume_and_gradcheck(patches, tmp_path):
    path, X = patches
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [
        "train",
        path,
        "--hidden",
        "5",
        "--max-iter",
        "4",
        "--workers",
        "1",
        "--memory-limit",
        "1GB",
        "--out",
        str(out),
    ]
    r = runner.invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    assert "Dashboard: http" in r.output and "model.npz" in r.output
    hist = json.loads((out / "history.json").read_text())
    assert hist[-1]["iteration"] == 4
    # --resume continues the saved spec (already finished: stays at 4 iterations, says so and
    # starts no cluster).
    r = runner.invoke(_cli(), ["train", "--resume", str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "nothing to do" in r.output and "--max-iter above 4" in r.output, r.output
    assert "Dashboard" not in r.output
    assert json.loads((out / "history.json").read_text())[-1]["iteration"] == 4
    # --resume --max-iter extends it on the trajectory of an uninterrupted 7-iteration run.
    r = runner.invoke(_cli(), ["train", "--resume", str(out), "--max-iter", "7", "--workers", "1"])
    assert r.exit_code == 0, r.output
    straight = tmp_path / "straight"
    r = runner.invoke(_cli(), [*args[:5], "7", *args[6:-1], str(straight)])
    assert r.exit_code == 0, r.output
    h_ext = json.loads((out / "history.json").read_text())
    h_str = json.loads((straight / "history.json").read_text())
    assert [e["iteration"] for e in h_ext] == list(range(8))
    assert [e["cost"] for e in h_ext] == [e["cost"] for e in h_str]
    with np.load(out / "model.npz") as a, np.load(straight / "model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("W1", "b1", "W2", "b2"))
    assert json.loads((out / "job.json").read_text())["spec"]["max_iter"] == 7
    r = runner.invoke(_cli(), ["train", "--resume", str(out), "--lam", "1e-3"])
    assert r.exit_code != 0 and "only --max-iter may change" in r.output
    r = runner.invoke(
        _cli(),
        [
            "gradcheck",
            path,
            "--hidden",
            "4",
            "--n-coords",
            "6",
            "--workers",
            "1",
            "--memory-limit",
            "1GB",
        ],
    )
    assert r.exit_code == 0, r.output
    diff = float(r.output.split("coordinates")[1].split(":")[1].split()[0])
    assert diff < 1e-7 and "gradient OK" in r.output


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--rho", "2"], "rho"),
        (["--hidden", "0"], "hidden"),
        (["--lam", "-1"], "lam"),
        (["--hidden", "a,b"], "--hidden"),
    ],
)
def test_cli_bad_spec_is_a_clean_message(patches, tmp_path, args, field):
    path, _ = patches
    r = CliRunner().invoke(_cli(), ["train", path, "--out", str(tmp_path / "x"), *args])
    assert r.exit_code != 0
    assert field in r.output and "Traceback" not in r.output


@pytest.mark.bitwise
def test_run_stage_cancelled_inside_an_evaluation_resumes_bitwise(two_workers, patches, tmp_path):
    from worker.engine import DistributedObjective
    from worker.stage import Hooks, Stage, run_stage

    path, _ = patches
    net = build_network(_spec(path), 36)
    theta0 = net.init_theta(7)

    def stage(name: str) -> Stage:
        return Stage.of(net, theta0, tmp_path / name, max_iter=10, pictures=False)

    full = run_stage(
        stage("full"), DistributedObjective(two_workers, path, net), Hooks(), write_cost=False
    )
    calls = [0]

    def stop_at_seventh_evaluation() -> bool:
        calls[0] += 1
        return calls[0] > 7

    f = DistributedObjective(two_workers, path, net, should_stop=stop_at_seventh_evaluation)
    cut = run_stage(stage("cut"), f, Hooks())
    assert cut.status == "cancelled" and f.n_evals == 7
    state = OptimizerState.load(tmp_path / "cut" / "state.npz")
    assert state.n_evals <= 7 and cut.iterations == state.iteration < 10
    again = run_stage(
        stage("cut"), DistributedObjective(two_workers, path, net), Hooks(), resume=True
    )
    assert again.status == "succeeded" and again.iterations == 10
    assert np.array_equal(again.theta, full.theta)
    assert again.evaluations == full.evaluations


def test_local_task_stops_when_superseded(two_workers, patches, tmp_path):
    """A newer run of the same job folder takes over: the older task stops itself."""
    path, _ = patches
    out = tmp_path / "owned"
    seen: list[dict] = []

    def take_over(e: dict) -> None:
        seen.append(e)
        if e["iteration"] >= 2:
            (out / ".owner").write_text("someone else")

    res = train(
        _spec(path, max_iter=300),
        out,
        client=two_workers,
        execution="local",
        on_iteration=take_over,
    )
    assert res.status == "cancelled" and res.iterations < 300
