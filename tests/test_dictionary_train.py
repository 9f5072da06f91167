"""Jobs of the dictionary kinds (relu-l1, topk) on the engine: full-batch and stochastic, the
same bits wherever they run, bitwise resume with AuxK's counters, the constraints kept."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sae import objective as obj
from sae.dictionary import Dictionary
from sae.optimize.stochastic import StochasticState
from service.cli import main as sae
from worker.dataset import open_dataset, write_dataset
from worker.layout import load_model
from worker.schedule import Schedule, check_spec
from worker.spec import TrainSpec
from worker.stage_id import StageId
from worker.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, np.ndarray]:
    """1,200 rows of 10 correlated features with an offset, in chunks of 100."""
    rng = np.random.default_rng(7)
    X = rng.normal(0, 1, (1200, 10)) @ rng.normal(0, 0.5, (10, 10)) + 2.0
    path = tmp_path_factory.mktemp("dict") / "ds"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100)
    return str(path), X


def _spec(path: str, **kw) -> TrainSpec:
    base = dict(dataset=path, hidden=24, max_iter=15, seed=3)
    base.update(kw)
    return TrainSpec(**base)


def _theta(out: Path) -> np.ndarray:
    return load_model(out / "model.npz")[1]


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "kind", [dict(kind="relu-l1", l1=0.05), dict(kind="topk", k=3, k_aux=6, aux_coeff=0.5)]
)
def test_full_batch_jobs_give_the_same_bits_in_the_driver_and_next_to_the_data(
    two_workers, data, tmp_path, kind
):
    path, X = data
    spec = _spec(path, **kind)
    a = train(spec, tmp_path / "local", client=two_workers, execution="local")
    b = train(spec, tmp_path / "dist", client=two_workers, execution="distributed")
    assert a.status == b.status == "succeeded" and a.iterations >= 3
    assert np.array_equal(_theta(tmp_path / "local"), _theta(tmp_path / "dist"))
    net, theta, _ = load_model(tmp_path / "dist" / "model.npz")
    assert isinstance(net, Dictionary) and net.kind == kind["kind"]
    J, _ = obj.cost(net, theta, X)  # the model's cost on the whole data, in memory
    assert J == pytest.approx(b.final_cost, rel=1e-10)
    assert b.final_cost < json.loads((tmp_path / "dist" / "history.json").read_text())[0]["cost"]
    # every job measures its model at the end (here on all rows: no validation split)
    m = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert m["split"] == "all" and m["examples"] == len(X) and b.metrics["l0"] == m["l0"]
    assert 0 < m["explained_variance"] < 1 and (tmp_path / "dist" / "density.png").exists()
    if kind["kind"] == "topk":
        assert m["l0"] <= 3


def test_b_dec_starts_at_the_training_chunks_mean_with_a_tied_encoder(data):
    path, X = data
    info = open_dataset(path)
    spec = _spec(path, kind="topk", k=3, optimizer="adam", validation_fraction=0.25)
    sched = Schedule(spec, info, Path("."))
    stage = sched.stage(StageId.single(), [])
    held = set(sched.held_out())
    assert held  # the mean is over the other chunks only
    rows = np.concatenate([X[i * 100 : (i + 1) * 100] for i in range(12) if i not in held])
    (W_enc, W_dec), (b_enc, b_dec) = stage.network.unpack(stage.theta0)
    np.testing.assert_allclose(b_dec, rows.mean(axis=0), rtol=1e-13)
    assert not np.allclose(b_dec, X.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(W_enc, W_dec.T)
    zeros = Schedule(_spec(path, kind="topk", k=3, b_dec_init="zeros", tied_init=False), info, ".")
    (W_enc, W_dec), (_, b_dec) = zeros.stage(StageId.single(), []).network.unpack(
        zeros.stage(StageId.single(), []).theta0
    )
    assert not b_dec.any() and not np.array_equal(W_enc, W_dec.T)


def _adam(path: str, **kw) -> TrainSpec:
    base = dict(
        kind="topk",
        k=2,
        k_aux=6,
        aux_coeff=0.25,
        dead_after=150,
        optimizer="adam",
        learning_rate=0.02,
        batch_size=100,
        epochs=3,
        log_every=4,
        checkpoint_every=5,
    )
    base.update(kw)
    return _spec(path, **base)


def test_stochastic_topk_resumes_bitwise_with_its_dead_latent_counters(two_workers, data, tmp_path):
    path, _ = data
    spec = _adam(path)
    full = train(spec, tmp_path / "full", client=two_workers)
    assert full.status == "succeeded" and full.iterations == 36
    state = StochasticState.load(tmp_path / "full" / "state.npz")
    since = np.asarray(state.rho_ema["1"])  # examples since each latent was last active
    assert since.shape == (24,) and np.all(since % 100 == 0) and since.max() >= 150
    stop = threading.Event()

    def at_step_10(e):
        if e["iteration"] >= 10:
            stop.set()

    cut = train(
        spec, tmp_path / "cut", client=two_workers, should_stop=stop.is_set, on_iteration=at_step_10
    )
    assert cut.status == "cancelled" and cut.iterations < 36
    res = train(spec, tmp_path / "cut", client=two_workers, resume=True)
    assert res.status == "succeeded" and res.iterations == 36
    assert np.array_equal(_theta(tmp_path / "cut"), _theta(tmp_path / "full"))
    # AuxK changed the trajectory: without it the same run ends elsewhere
    train(_adam(path, k_aux=None), tmp_path / "plain", client=two_workers)
    assert not np.array_equal(_theta(tmp_path / "plain"), _theta(tmp_path / "full"))
    assert "1" not in StochasticState.load(tmp_path / "plain" / "state.npz").rho_ema


def test_stochastic_steps_keep_decoder_columns_at_unit_norm(two_workers, data, tmp_path):
    path, _ = data
    spec = _adam(
        path,
        kind="relu-l1",
        l1=0.05,
        k=None,
        k_aux=None,
        aux_coeff=None,
        dead_after=None,
        epochs=1,
        validation_fraction=0.25,
    )
    res = train(spec, tmp_path / "unit", client=two_workers)
    assert res.status == "succeeded"
    held = Schedule(spec, open_dataset(path), tmp_path).held_out()
    assert res.metrics["split"] == "held-out" and res.metrics["examples"] == 100 * len(held)
    net, theta, _ = load_model(tmp_path / "unit" / "model.npz")
    with np.load(tmp_path / "unit" / "model.npz") as npz:
        W2 = npz["W2"]
    np.testing.assert_allclose(np.linalg.norm(W2, axis=0), 1.0, rtol=1e-14)
    V = net.unpack(theta)[0][1]
    np.testing.assert_allclose(np.linalg.norm(V, axis=0), 1.0, rtol=1e-14)
    free = train(
        spec.model_copy(update={"unit_norm_decoder": False}), tmp_path / "free", client=two_workers
    )
    V = load_model(free.model_path)[0].unpack(load_model(free.model_path)[1])[0][1]
    assert np.abs(np.linalg.norm(V, axis=0) - 1.0).max() > 1e-3


def test_cli_trains_a_topk_model_and_names_bad_fields(data, tmp_path):
    path, X = data
    out = tmp_path / "cli"
    args = ["train", path, "--kind", "topk", "--k", "3", "--hidden", "16", "--max-iter", "5"]
    res = CliRunner().invoke(sae, [*args, "--out", str(out), "--plan", "local"])
    assert res.exit_code == 0, res.output
    net, theta, meta = load_model(out / "model.npz")
    assert meta["spec"]["kind"] == "topk" and meta["spec"]["rho"] is None
    f = obj.forward(net, theta, X[:50], upto=1)[1]
    assert np.count_nonzero(f, axis=1).max() <= 3
    for extra, field in [
        (["--k", "17"], "k"),
        (["--rho", "0.1"], "rho"),
        (["--l1", "0.1"], "l1"),
        (["--k-aux", "4", "--passes", "fused"], "passes"),
        (["--activation", "sigmoid"], "activation"),
    ]:
        bad = [a for a in args if a not in ("--k", "3")] if extra[0] == "--k" else args
        res = CliRunner().invoke(sae, [*bad, *extra, "--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and f"invalid training spec: {field}: " in res.output, res.output
    res = CliRunner().invoke(sae, ["train", path, "--kind", "topk", "--out", str(tmp_path / "b")])
    assert "k: kind 'topk' needs k" in res.output


def test_a_job_can_start_from_a_saved_model_and_refuses_another_kind(data, tmp_path):
    path, X = data
    info = open_dataset(path)
    first = _spec(path, kind="topk", k=3)
    net = Schedule(first, info, tmp_path).network()
    theta = net.init_theta(11, mean=X.mean(axis=0))
    from worker.layout import save_model

    save_model(tmp_path / "start.npz", net, theta)
    np.save(tmp_path / "a.npy", theta)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "start.npz").read_bytes()[:500])
    spec = _spec(path, kind="topk", k=3, init_model=str(tmp_path / "start.npz"))
    stage = Schedule(spec, info, tmp_path).stage(StageId.single(), [])
    assert np.array_equal(stage.theta0, theta)
    for other, words in [
        (dict(kind="topk", k=3, hidden=12), "sizes"),
        (dict(kind="relu-l1"), "topk model"),
        (dict(kind="topk", k=3, init_model=str(tmp_path / "none.npz")), "no model file"),
        (dict(kind="topk", k=3, unit_norm_decoder=False), "unit-norm decoder"),
        (dict(kind="topk", k=3, init_model=str(tmp_path / "a.npy")), "not a model.npz"),
        (dict(kind="topk", k=3, init_model=str(tmp_path / "cut.npz")), "not a model.npz"),
    ]:
        bad = _spec(path, **{"init_model": str(tmp_path / "start.npz"), **other})
        with pytest.raises(ValueError, match=f"^init_model: .*{words}"):
            check_spec(bad, info)
    with pytest.raises(ValueError, match="init_model"):
        _spec(path, hidden=[8, 4], init_model="x.npz")


def test_train_result_is_json_and_a_resumed_job_measures_its_new_model(two_workers, data, tmp_path):
    path, _ = data
    spec = _spec(path, kind="relu-l1", l1=0.05, max_iter=4)
    res = train(spec, tmp_path / "j", client=two_workers)
    json.dumps(res.to_dict())
    before = json.loads((tmp_path / "j" / "metrics.json").read_text())
    longer = spec.model_copy(update={"max_iter": 12})
    again = train(longer, tmp_path / "j", client=two_workers, resume=True)
    after = json.loads((tmp_path / "j" / "metrics.json").read_text())
    assert again.iterations > res.iterations and after["mse"] != before["mse"]
    assert again.metrics["mse"] == after["mse"]


def test_a_failure_to_measure_does_not_fail_the_trained_job(
    two_workers, data, tmp_path, monkeypatch
):
    import worker.evaluate

    def broken(root, client=None):
        raise TypeError("something unexpected")

    monkeypatch.setattr(worker.evaluate, "evaluate_job", broken)
    path, _ = data
    res = train(
        _spec(path, kind="relu-l1", l1=0.05, max_iter=3), tmp_path / "m", client=two_workers
    )
    assert res.status == "succeeded" and res.metrics is None
    assert "metrics: not measured (TypeError: something unexpected)" in res.message
    assert (tmp_path / "m" / "model.npz").exists()
