"""Stochastic training over chunks: Adam and SGD, minibatches, exact resume, same bits."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from sae import objective as obj
from sae.gradcheck import check_gradient
from sae.network import Network
from sae.optimize.stochastic import StochasticState, learning_rate, step, stochastic_options
from worker.batches import Batches
from worker.chunks import kept_stats
from worker.dataset import open_dataset, write_dataset
from worker.engine import BatchObjective
from worker.layout import load_model
from worker.schedule import check_spec
from worker.spec import TrainSpec
from worker.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, np.ndarray]:
    """1,000 rows of 16 features in (0, 1), in chunks of 90 (the last one shorter)."""
    X = np.random.default_rng(4).random((1000, 16)) ** 2 * 0.9 + 0.05
    path = tmp_path_factory.mktemp("sgd") / "ds"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=90, sample_shape=(4, 4))
    return str(path), X


def _spec(path: str, **kw) -> TrainSpec:
    base = dict(
        dataset=path,
        hidden=6,
        rho=0.1,
        beta=1.0,
        lam=1e-4,
        optimizer="adam",
        learning_rate=0.02,
        batch_size=64,
        epochs=2,
        log_every=3,
        checkpoint_every=5,
        seed=1,
    )
    base.update(kw)
    return TrainSpec(**base)


def _theta(out: Path) -> np.ndarray:
    return load_model(out / "model.npz")[1]


# ----------------------------------------------------------------------------- the optimizers


def _adam_loop(theta, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written coordinate by coordinate from Kingma & Ba (2015), Algorithm 1."""
    theta = [float(x) for x in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            theta[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(theta)


def _sgd_loop(theta, grads, lr, mu, nesterov):
    """SGD with momentum as PyTorch documents it (buf = g at the first step)."""
    theta = [float(x) for x in theta]
    buf = None
    for g in grads:
        buf = list(g) if buf is None else [mu * b + gi for b, gi in zip(buf, g, strict=True)]
        d = [gi + mu * b for gi, b in zip(g, buf, strict=True)] if nesterov else buf
        theta = [x - lr * di for x, di in zip(theta, d, strict=True)]
    return np.array(theta)


def test_adam_and_sgd_steps_follow_their_equations():
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=7)
    grads = [rng.normal(size=7) for _ in range(5)]
    st = StochasticState.start("adam", theta0, {"learning_rate": 0.05})
    for g in grads:
        st = step(st, g, 0.05)
    np.testing.assert_allclose(st.theta, _adam_loop(theta0, grads, 0.05), rtol=1e-13)
    for nesterov in (False, True):
        st = StochasticState.start("sgd", theta0, {"momentum": 0.8, "nesterov": nesterov})
        for g in grads:
            st = step(st, g, 0.1)
        np.testing.assert_allclose(st.theta, _sgd_loop(theta0, grads, 0.1, 0.8, nesterov))


def test_adam_in_cache_sized_blocks_has_the_bits_of_the_whole_array_expression():
    """The Adam step runs block by block (``STEP_BLOCK`` elements); each operation is the one
    of the whole-array expression, in its order: bitwise the same theta, m and v."""
    rng = np.random.default_rng(3)
    n = 40_000  # two full blocks and a part
    theta, m, v = rng.normal(size=n), None, None
    st = StochasticState.start("adam", theta, {"learning_rate": 0.01, "eps": 1e-7})
    b1, b2, eps = 0.9, 0.999, 1e-7
    for t in range(1, 5):
        g = rng.normal(size=n)
        lr = 0.01 / t
        st = step(st, g, lr)
        m = (1.0 - b1) * g if m is None else b1 * m + (1.0 - b1) * g
        v = (1.0 - b2) * (g * g) if v is None else b2 * v + (1.0 - b2) * (g * g)
        theta = theta - lr * (m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps)
        assert np.array_equal(st.m, m) and np.array_equal(st.v, v)
        assert np.array_equal(st.theta, theta)


def test_gradient_clipping_scales_long_gradients_only():
    theta0 = np.zeros(3)
    st = StochasticState.start("sgd", theta0, {"momentum": 0.0, "clip_norm": 1.0})
    out = step(st, np.array([3.0, 4.0, 0.0]), 1.0)
    np.testing.assert_allclose(out.theta, [-0.6, -0.8, 0.0])
    assert out.grad_norm == 5.0  # the norm before clipping is what the history shows
    short = step(st, np.array([0.3, 0.4, 0.0]), 1.0)
    np.testing.assert_allclose(short.theta, [-0.3, -0.4, 0.0])


def test_learning_rate_schedules():
    o = stochastic_options("adam", {"learning_rate": 1.0, "warmup_steps": 4})
    assert [learning_rate(o, t, 20) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(o, 19, 20) == 1.0
    cos = stochastic_options(
        "adam", {"learning_rate": 1.0, "warmup_steps": 4, "schedule": "cosine"}
    )
    assert learning_rate(cos, 4, 20) == 1.0 and learning_rate(cos, 20, 20) == pytest.approx(0)
    assert learning_rate(cos, 12, 20) == pytest.approx(0.5)
    lin = stochastic_options("sgd", {"learning_rate": 2.0, "schedule": "linear"})
    assert learning_rate(lin, 5, 10) == pytest.approx(1.0) and learning_rate(lin, 0, 10) == 2.0


def test_state_saves_and_loads_exactly(tmp_path):
    rng = np.random.default_rng(1)
    st = StochasticState.start("adam", rng.normal(size=5), {"schedule": "cosine"})
    st = step(st, rng.normal(size=5), 1e-3).replace(
        epoch=2, batch=3, samples=77, J=0.1 + 0.2, rho_ema={"2": rng.random(4)}
    )
    st.save(tmp_path / "s.npz")
    back = StochasticState.load(tmp_path / "s.npz")
    for name in ("theta", "m", "v"):
        assert np.array_equal(getattr(back, name), getattr(st, name))
    assert np.array_equal(back.rho_ema["2"], st.rho_ema["2"])
    assert (back.step, back.epoch, back.batch, back.samples, back.J, back.grad_norm) == (
        st.step,
        st.epoch,
        st.batch,
        st.samples,
        st.J,
        st.grad_norm,
    )
    assert back.options == st.options


# ----------------------------------------------------------------------------- the batches


def test_an_epoch_visits_every_row_once_reading_chunk_windows():
    b = Batches.of(1000, 90, 64, seed=3, window=3)
    assert b.per_epoch == 16 and len(b.chunk_rows) == 12 and b.chunk_rows[-1] == 10
    for epoch in (0, 1):
        seen, windows = [], []
        order = list(b.chunk_order(epoch))
        for t in range(b.per_epoch):
            parts = b.parts(epoch, t)
            assert [c for c, _ in parts] == sorted(c for c, _ in parts)
            seen += [c * 90 + r for c, rows in parts for r in rows]
            windows.append({order.index(c) // 3 for c, _ in parts})
        assert sorted(seen) == list(range(1000))  # every row exactly once
        assert all(len(w) <= 2 and max(w) - min(w) <= 1 for w in windows)
        # windows are read one after the other: once left, a window is never read again
        flat = [w for ws in windows for w in sorted(ws)]
        assert flat == sorted(flat)
    a0, a1 = b.parts(0, 5), b.parts(1, 5)
    assert any(not np.array_equal(r0, r1) for (_, r0), (_, r1) in zip(a0, a1, strict=False))
    again = Batches.of(1000, 90, 64, seed=3, window=3).parts(1, 5)  # only (seed, epoch, t)
    assert all(
        c0 == c1 and np.array_equal(r0, r1) for (c0, r0), (c1, r1) in zip(a1, again, strict=True)
    )
    assert sum(len(r) for _, r in b.parts(0, 15)) == 1000 - 15 * 64


def test_bad_batch_sizes_and_windows_are_named():
    with pytest.raises(ValueError, match="^batch_size: 2000 is larger than the dataset"):
        Batches.of(1000, 90, 2000)
    with pytest.raises(ValueError, match="^batch_size"):
        Batches.of(1000, 90, 0)
    with pytest.raises(ValueError, match="^shuffle_window"):
        Batches.of(1000, 90, 10, window=0)


# ----------------------------------------------------------------------------- the objective


def test_batch_objective_is_the_exact_objective_of_the_batch(two_workers, data):
    path, X = data
    net = Network.autoencoder(16, 6, lam=1e-4, rho=0.1, beta=1.0)
    theta = net.init_theta(2)
    b = Batches.of(1000, 90, 128, seed=5)
    f = BatchObjective(two_workers, path, net, job="batch")
    parts = b.parts(0, 3)
    rows = np.concatenate([c * 90 + r for c, r in parts])
    before = sum(s["hits"] for s in two_workers.run(kept_stats).values())
    J, g, rho_hat = f(theta, parts)
    # each part's pass 2 took up what its pass 1 left on that worker
    assert sum(s["hits"] for s in two_workers.run(kept_stats).values()) == before + len(parts)
    J0, g0 = obj.cost(net, theta, X[rows])
    assert abs(J - J0) <= 1e-12 * abs(J0)
    np.testing.assert_allclose(g, g0, rtol=1e-10, atol=1e-13)
    A2 = obj.forward(net, theta, X[rows])[1]
    np.testing.assert_allclose(rho_hat[1], A2.mean(axis=0), rtol=1e-12)
    diff = check_gradient(lambda th: f(th, parts)[:2], theta, n_coords=15, seed=1)
    assert diff < 1e-7
    # fused passes: the same numbers
    Jf, gf, _ = BatchObjective(two_workers, path, net, passes="fused", job="bf")(theta, parts)
    assert abs(Jf - J0) <= 1e-12 * abs(J0) and np.allclose(gf, g0, rtol=1e-10, atol=1e-13)


def test_running_average_of_rho_hat_enters_the_gradient(two_workers, data):
    path, X = data
    net = Network.autoencoder(16, 6, lam=1e-4, rho=0.1, beta=1.0)
    theta = net.init_theta(3)
    parts = Batches.of(1000, 90, 100, seed=2).parts(0, 0)
    rows = np.concatenate([c * 90 + r for c, r in parts])
    previous = {1: np.full(6, 0.3)}
    J, g, rho = BatchObjective(two_workers, path, net, job="ema")(theta, parts, previous, 0.9)
    batch = obj.forward(net, theta, X[rows])[1].mean(axis=0)
    np.testing.assert_allclose(rho[1], 0.9 * 0.3 + 0.1 * batch, rtol=1e-12)
    s1 = obj.pass1(net, theta, X[rows])
    s2 = obj.pass2(net, theta, X[rows], {1: rho[1]})
    J0, g0 = obj.finalize(net, theta, obj.merge_sums(s1, s2))
    assert J == pytest.approx(J0, rel=1e-12)  # the batch objective's value
    np.testing.assert_allclose(g, g0, rtol=1e-10, atol=1e-13)  # sparsity term from the average
    assert not np.allclose(g, obj.cost(net, theta, X[rows])[1], rtol=1e-6)


# ----------------------------------------------------------------------------- whole jobs


def test_adam_job_writes_steps_epochs_and_samples(two_workers, data, tmp_path):
    path, X = data
    seen = []
    res = train(_spec(path), tmp_path / "job", client=two_workers, on_iteration=seen.append)
    assert res.status == "succeeded" and res.iterations == 2 * 16 == res.evaluations
    hist = json.loads((tmp_path / "job" / "history.json").read_text())
    assert hist == seen
    assert [e["iteration"] for e in hist] == sorted({*range(3, 33, 3), 16, 32})
    assert {e["epoch"] for e in hist} == {0, 1} and hist[-1]["samples"] == 2000
    assert hist[-1]["cost"] < hist[0]["cost"]
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["execution"] == ["distributed"] and job["spec"]["optimizer"] == "adam"
    net, theta, _ = load_model(tmp_path / "job" / "model.npz")
    J_end = obj.cost(net, theta, X)[0]
    J_start = obj.cost(net, net.init_theta(1), X)[0]
    assert J_end < 0.5 * J_start  # it learned the whole dataset, not only its last batch


@pytest.mark.bitwise
def test_stopped_and_crashed_jobs_resume_bitwise(two_workers, data, tmp_path):
    path, _ = data
    spec = _spec(
        path,
        optimizer="sgd",
        learning_rate=0.2,
        nesterov=True,
        lr_schedule="cosine",
        warmup_steps=4,
        clip_grad_norm=2.0,
    )
    train(spec, tmp_path / "full", client=two_workers)
    stop = threading.Event()

    def at_step_10(e):
        if e["iteration"] >= 10:
            stop.set()

    cut = train(
        spec, tmp_path / "cut", client=two_workers, should_stop=stop.is_set, on_iteration=at_step_10
    )
    assert cut.status == "cancelled" and cut.iterations == 12  # logged every 3 steps
    res = train(spec, tmp_path / "cut", client=two_workers, resume=True)
    assert res.status == "succeeded" and res.iterations == 32
    assert np.array_equal(_theta(tmp_path / "cut"), _theta(tmp_path / "full"))

    class Crash(Exception):
        pass

    def crash_at_step_12(e):  # logged at 12, last checkpoint at 10: steps 11, 12 are redone
        if e["iteration"] >= 11:
            raise Crash

    with pytest.raises(Crash):
        train(spec, tmp_path / "crash", client=two_workers, on_iteration=crash_at_step_12)
    hist = json.loads((tmp_path / "crash" / "history.json").read_text())
    assert hist[-1]["iteration"] == 12  # the history ran ahead of the checkpoint
    res = train(spec, tmp_path / "crash", client=two_workers, resume=True)
    assert res.status == "succeeded"
    assert np.array_equal(_theta(tmp_path / "crash"), _theta(tmp_path / "full"))
    a = json.loads((tmp_path / "full" / "history.json").read_text())
    b = json.loads((tmp_path / "crash" / "history.json").read_text())
    assert [(e["iteration"], e["cost"]) for e in a] == [(e["iteration"], e["cost"]) for e in b]


@pytest.mark.bitwise
def test_same_bits_on_one_or_two_workers_and_after_a_worker_dies(two_workers, data, tmp_path):
    from worker.cluster import get_client

    path, _ = data
    spec = _spec(path, sparsity_estimate="ema", epochs=1)
    ref = train(spec, tmp_path / "two", client=two_workers)
    assert ref.status == "succeeded"
    with get_client(workers=1, memory_limit="1GB") as (c1, _):
        train(spec, tmp_path / "one", client=c1)
    assert np.array_equal(_theta(tmp_path / "one"), _theta(tmp_path / "two"))
    pids = two_workers.run(os.getpid)
    killed = []

    def kill_one(e):
        if e["iteration"] >= 6 and not killed:
            victim = sorted(pids)[0]
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)

    hit = train(spec, tmp_path / "hit", client=two_workers, on_iteration=kill_one)
    assert killed and hit.status == "succeeded"
    assert np.array_equal(_theta(tmp_path / "hit"), _theta(tmp_path / "two"))
    two_workers.wait_for_workers(2, timeout=60)


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "kw",
    [
        dict(passes="fused", dtype="float32", validation_fraction=0.2, early_stopping=50),
        dict(sparsity_estimate="ema", lr_schedule="cosine", warmup_steps=4),
        dict(kind="topk", k=2, k_aux=3, activation="relu", rho=None, beta=0.0),
    ],
    ids=["fused-validation", "ema-cosine", "topk-auxk"],
)
def test_steps_chained_on_the_workers_equal_steps_taken_one_at_a_time(
    two_workers, data, tmp_path, monkeypatch, kw
):
    """The workers chain each step on the last one's state (the loop takes records, and the
    state only at checkpoints and held-out costs); a chain of 3 steps here, so chains start
    anew from a state taken back many times: every file the job writes has the bits of the
    job whose loop takes each step itself."""
    import worker.stochastic as stochastic

    path, _ = data
    spec = _spec(path, checkpoint_every=4, **kw)
    monkeypatch.setattr(stochastic, "CHAIN", 3)
    used = []
    real = stochastic._stepper
    monkeypatch.setattr(
        stochastic, "_stepper", lambda *a: used.append(type(s := real(*a)).__name__) or s
    )
    train(spec, tmp_path / "chained", client=two_workers)
    monkeypatch.setattr(stochastic, "CHAIN_STATE_BYTES", 0)  # every step taken here
    train(spec, tmp_path / "here", client=two_workers)
    assert used == ["_Chained", "_Here"]
    for name in ("model.npz", "state.npz", "best.npz"):
        a, b = tmp_path / "chained" / name, tmp_path / "here" / name
        assert a.exists() == b.exists()
        if a.exists():
            za, zb = np.load(a), np.load(b)
            assert sorted(za.files) == sorted(zb.files)
            for f in za.files:
                assert np.array_equal(za[f], zb[f]), (name, f)
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("chained", "here"))
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in ha]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in hb]


def test_deep_job_with_sgd_stages(two_workers, data, tmp_path):
    path, _ = data
    spec = _spec(
        path,
        hidden=[8, 4],
        optimizer="sgd",
        learning_rate=0.1,
        epochs=1,
        finetune_epochs=1,
        code_activation="linear",
    )
    res = train(spec, tmp_path / "deep", client=two_workers)
    assert res.status == "succeeded" and res.iterations == 3 * 16
    hist = json.loads((tmp_path / "deep" / "history.json").read_text())
    assert [e["stage"] for e in hist][:1] == ["pretrain 1/2"] and hist[-1]["stage"] == "finetune"
    assert all((tmp_path / "deep" / d / "done.json").exists() for d in ("stage-1", "finetune"))
    assert spec.total_iterations(1000) == 48
    alone = spec.model_copy(update={"pretrain": "none"})
    res = train(alone, tmp_path / "alone", client=two_workers)  # fine-tuning from a random start
    assert res.status == "succeeded" and res.iterations == 16
    with pytest.raises(ValueError, match="^finetune_epochs: "):
        check_spec(alone.model_copy(update={"finetune_epochs": 0}), open_dataset(path))


def test_bad_stochastic_specs_name_their_field(data):
    path, _ = data
    info = open_dataset(path)
    for field, kw in (
        ("batch_size", {"batch_size": 0}),
        ("learning_rate", {"learning_rate": -0.1}),
        ("lr_schedule", {"lr_schedule": "step"}),
        ("epochs", {"epochs": 0}),
        ("sparsity_estimate", {"sparsity_estimate": "ema", "passes": "fused"}),
        ("momentum", {"momentum": 1.0}),
    ):
        with pytest.raises(ValidationError, match=field):
            _spec(path, **kw)
    with pytest.raises(ValueError, match="^batch_size: 5000 is larger than the dataset"):
        check_spec(_spec(path, batch_size=5000), info)


# ----------------------------------------------------------------------------- validation


def test_held_out_chunks_are_never_trained_on_and_give_val_cost(two_workers, data, tmp_path):
    from worker.batches import held_out_chunks

    path, X = data
    spec = _spec(path, validation_fraction=0.2, validate_every=4, epochs=2)
    held = held_out_chunks(12, 0.2, spec.seed)
    assert len(held) == 2
    b = Batches.of(1000, 90, 64, 1, 4, held_out=held)
    for epoch in (0, 1):
        chunks = {c for t in range(b.per_epoch) for c, _ in b.parts(epoch, t)}
        assert chunks == set(range(12)) - set(held)
    res = train(spec, tmp_path / "v", client=two_workers)
    rows = np.concatenate([np.arange(i * 90, min((i + 1) * 90, 1000)) for i in held])
    per_epoch = -(-(1000 - len(rows)) // 64)
    assert res.iterations == 2 * per_epoch
    hist = json.loads((tmp_path / "v" / "history.json").read_text())
    checked = [e for e in hist if "val_cost" in e]
    assert [e["iteration"] for e in checked] == sorted(
        {*range(4, 2 * per_epoch + 1, 4), per_epoch, 2 * per_epoch}
    )
    net, _, _ = load_model(tmp_path / "v" / "model.npz")
    best = min(checked, key=lambda e: e["val_cost"])
    theta_best = load_model(tmp_path / "v" / "best.npz")[1]
    assert obj.cost(net, theta_best, X[rows])[0] == pytest.approx(best["val_cost"], rel=1e-12)


def test_a_separate_validation_dataset_gives_val_cost_and_the_final_metrics(
    two_workers, data, tmp_path
):
    path, X = data
    Xv = np.random.default_rng(9).random((250, 16)) ** 2 * 0.9 + 0.05
    vpath = tmp_path / "val"
    write_dataset(vpath, Xv, *Xv.shape, dtype="float64", chunk_rows=100)
    spec = _spec(path, validation_dataset=str(vpath), validate_every=5, epochs=1, early_stopping=50)
    res = train(spec, tmp_path / "v", client=two_workers)
    assert res.status == "succeeded" and res.iterations == -(-1000 // 64)  # trains on all rows
    hist = json.loads((tmp_path / "v" / "history.json").read_text())
    checked = [e for e in hist if "val_cost" in e]
    assert len(checked) >= 3
    net, _, _ = load_model(tmp_path / "v" / "model.npz")
    best = min(checked, key=lambda e: e["val_cost"])
    theta_best = load_model(tmp_path / "v" / "best.npz")[1]
    assert obj.cost(net, theta_best, Xv)[0] == pytest.approx(best["val_cost"], rel=1e-12)
    assert res.metrics["split"] == "validation dataset" and res.metrics["examples"] == 250
    narrow = tmp_path / "narrow"
    write_dataset(narrow, Xv[:, :8], 250, 8, dtype="float64")
    with pytest.raises(ValueError, match="^validation_dataset: .* 8 features"):
        train(_spec(path, validation_dataset=str(narrow)), tmp_path / "n", client=two_workers)
    with pytest.raises(ValueError, match="^validation_dataset: "):
        train(
            _spec(path, validation_dataset=str(tmp_path / "no")), tmp_path / "m", client=two_workers
        )
    with pytest.raises(ValueError, match="^validation_dataset: only for"):
        check_spec(
            _spec(path, optimizer="lbfgs", validation_dataset=str(vpath)), open_dataset(path)
        )
    with pytest.raises(ValidationError, match="not both"):
        _spec(path, validation_dataset=str(vpath), validation_fraction=0.2)


def _files(folder: Path) -> dict:
    """What a stage's folder holds that is deterministic: its arrays and its history."""
    out = {}
    for name in ("model.npz", "state.npz", "best.npz"):
        if (folder / name).exists():
            z = np.load(folder / name)
            out[name] = {f: (z[f].dtype.str, z[f].shape, z[f].tobytes()) for f in z.files}
    hist = json.loads((folder / "history.json").read_text())
    out["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in hist]
    return out


@pytest.mark.bitwise
@pytest.mark.parametrize("chained", [True, False], ids=["chained", "here"])
def test_a_stop_during_a_held_out_cost_resumes_with_that_held_out_cost(
    two_workers, data, tmp_path, monkeypatch, chained
):
    """The stop arrives after step 8's batch, while its held-out cost is computed (which the
    stop cuts short): the resumed stage computes that held-out cost first, so its history,
    best model and early-stopping count are those of the uninterrupted stage."""
    import worker.stochastic as stochastic

    if not chained:
        monkeypatch.setattr(stochastic, "CHAIN_STATE_BYTES", 0)
    path, _ = data
    spec = _spec(path, validation_fraction=0.2, validate_every=4, early_stopping=50)
    train(spec, tmp_path / "full", client=two_workers)
    stop = threading.Event()
    real = stochastic._validates

    def stop_at_step_8(stage, state, total):
        if state.step == 8:
            stop.set()
        return real(stage, state, total)

    monkeypatch.setattr(stochastic, "_validates", stop_at_step_8)
    cut = train(spec, tmp_path / "cut", client=two_workers, should_stop=stop.is_set)
    assert cut.status == "cancelled" and cut.iterations == 8
    hist = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert hist[-1]["iteration"] == 8 and "val_cost" not in hist[-1]
    monkeypatch.setattr(stochastic, "_validates", real)
    res = train(spec, tmp_path / "cut", client=two_workers, resume=True)
    assert res.status == "succeeded"
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")


@pytest.mark.bitwise
def test_a_stop_whose_last_state_is_out_of_reach_resumes_from_the_last_checkpoint(
    two_workers, data, tmp_path, monkeypatch
):
    """Stopped while the scheduler is away (the state of the last step is lost with it): the
    stage ends cancelled, not failed, and resumes bitwise from its last checkpoint."""
    import worker.stochastic as stochastic
    from worker.engine import SchedulerLost

    path, _ = data
    spec = _spec(path)
    train(spec, tmp_path / "full", client=two_workers)
    stop = threading.Event()
    real = stochastic._Chained.full

    def lost_once_stopped(self):
        if stop.is_set():
            raise SchedulerLost("scheduler: the connection was lost and did not come back")
        return real(self)

    monkeypatch.setattr(stochastic._Chained, "full", lost_once_stopped)
    cut = train(
        spec,
        tmp_path / "cut",
        client=two_workers,
        should_stop=stop.is_set,
        on_iteration=lambda e: e["iteration"] >= 12 and stop.set(),
    )
    assert cut.status == "cancelled" and "resumes from its last checkpoint" in cut.message
    assert StochasticState.load(tmp_path / "cut" / "state.npz").step == 10  # every 5 steps
    monkeypatch.setattr(stochastic._Chained, "full", real)
    res = train(spec, tmp_path / "cut", client=two_workers, resume=True)
    assert res.status == "succeeded"
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")


def _overshooting(path: str) -> TrainSpec:
    """SGD with a learning rate far too large: the held-out cost soon stops improving."""
    return _spec(
        path,
        optimizer="sgd",
        learning_rate=5.0,
        momentum=0.9,
        epochs=20,
        validation_fraction=0.2,
        validate_every=2,
        early_stopping=2,
    )


def test_early_stopping_keeps_the_best_model(two_workers, data, tmp_path):
    path, X = data
    spec = _overshooting(path)
    res = train(spec, tmp_path / "es", client=two_workers)
    assert res.status == "succeeded" and res.iterations < 20 * 15
    assert "early stopping" in res.message and "best.npz" in res.message
    hist = json.loads((tmp_path / "es" / "history.json").read_text())
    vals = [e["val_cost"] for e in hist if "val_cost" in e]
    assert min(vals[-2:]) >= min(vals) and len(vals) >= 3


def test_cli_holds_out_chunks_validates_and_stops_early(data, tmp_path):
    """``sae train --validation-fraction F --validate-every N --early-stopping P``: the held-out
    costs are in the history every N steps, best.npz is kept, and a stage with no new best in
    P held-out costs ends early; a fraction outside (0, 1) is a message naming the field."""
    from click.testing import CliRunner

    from service.cli import main as sae

    path, _ = data
    args = ["train", path, "--hidden", "6", "--optimizer", "adam", "--learning-rate", "0.5"]
    args += ["--batch-size", "64", "--epochs", "40", "--workers", "1"]
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        sae,
        [*args, "--validation-fraction", "0.25", "--validate-every", "3", "--early-stopping", "2"]
        + ["--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    hist = json.loads((out / "history.json").read_text())
    vals = [e["iteration"] for e in hist if "val_cost" in e]
    assert vals[:2] == [3, 6] and (out / "best.npz").exists()
    assert hist[-1]["iteration"] < 40 * 10  # ended early (epochs of 810 training rows)
    for bad, field in [("1.5", "validation-fraction"), ("0", "validation-fraction")]:
        res = CliRunner().invoke(sae, [*args, "--validation-fraction", bad, "--out", str(out)])
        assert res.exit_code != 0 and f"invalid training spec: {field}" in res.output, res.output


def test_validation_errors_name_their_field(data):
    path, _ = data
    info = open_dataset(path)
    with pytest.raises(ValueError, match="^validation_fraction: 0.99 of the dataset's 12 chunks"):
        check_spec(_spec(path, validation_fraction=0.99), info)
    with pytest.raises(ValueError, match="^validation_fraction: only for"):
        check_spec(_spec(path, optimizer="lbfgs", validation_fraction=0.2), info)
    with pytest.raises(ValidationError, match="early_stopping"):
        _spec(path, early_stopping=3)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValidationError, match="validation_fraction"):
            _spec(path, validation_fraction=bad)
    with pytest.raises(ValueError, match=r"^batch_size: 900 is larger than the training chunks"):
        check_spec(_spec(path, validation_fraction=0.2, batch_size=900), info)


def test_resuming_a_finished_adam_job_has_nothing_to_do(two_workers, data, tmp_path):
    from click.testing import CliRunner

    from service.cli import main as sae

    path, _ = data
    out = tmp_path / "done"
    assert train(_spec(path, epochs=1), out, client=two_workers).status == "succeeded"
    res = CliRunner().invoke(sae, ["train", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output and "finished at step 16 (all 16 steps)" in res.output
    res = CliRunner().invoke(sae, ["train", "--resume", str(out), "--max-iter", "50"])
    assert res.exit_code != 0 and "epochs" in res.output and "Traceback" not in res.output


def test_a_stage_that_stopped_early_stays_stopped_on_resume(two_workers, data, tmp_path):
    path, _ = data
    spec = _overshooting(path)
    first = train(spec, tmp_path / "es", client=two_workers)
    assert "early stopping" in first.message
    again = train(spec, tmp_path / "es", client=two_workers, resume=True)
    assert again.iterations == first.iterations and "stopped early" in again.message
