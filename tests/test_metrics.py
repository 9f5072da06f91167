"""Model metrics (issue 9, part 2): sae.metrics against a direct computation on the whole
array for every kind, chunk sums, the feature-density picture, worker.evaluate in this
process and on a cluster (same bits), a job's metrics, `sae evaluate`, and the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sae import metrics as sm
from sae import objective as obj
from sae.dictionary import Dictionary
from sae.display import save_density_png
from sae.network import Network
from service.cli import main as sae_cli
from worker import layout
from worker.dataset import write_dataset
from worker.evaluate import evaluate, evaluate_job, read_metrics, write_metrics

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / ".." / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
PNG = b"\x89PNG\r\n\x1a\n"
SCALARS = ("mse", "fvu", "explained_variance", "l0", "dead", "dead_fraction", "cosine",
           "shrinkage", "examples", "zero_norm_examples", "zero_reconstructions")  # fmt: skip


# ----------------------------------------------------------------------------- models
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _model(kind: str, n: int = 16, seed: int = 0):
    """(net, theta) with random weights large enough that some units are inactive; the
    dictionaries have latent 0 dead (a bias of -100)."""
    rng = np.random.default_rng(seed)
    if kind == "sigmoid":
        net = Network.autoencoder(n, 9, rho=0.1, beta=3)
    elif kind == "tanh":
        net = Network.autoencoder(n, 9, activation="tanh", output_activation="linear")
    elif kind == "deep":  # 16-6-3-6-16 with a linear code layer
        net = Network((n, 6, 3, 6, n), ("sigmoid", "linear", "sigmoid", "linear"))
    elif kind == "relu-l1":
        net = Dictionary.of("relu-l1", n, 12, l1=1e-3)
    else:
        net = Dictionary.of("topk", n, 12, k=3)
    theta = rng.normal(scale=0.7, size=net.n_params)
    if kind in ("relu-l1", "topk"):
        Ws, bs = net.unpack(theta)
        bs[0][0] = -100.0
        theta = net.pack(Ws, bs)
    return net, theta


KINDS = ["sigmoid", "tanh", "deep", "relu-l1", "topk"]


def _direct(kind: str, net, theta, X, threshold: float = 0.1):
    """(x_hat, latents, active) written out with numpy from the weights."""
    Ws, bs = net.unpack(theta)
    if kind == "sigmoid":
        a = _sigmoid(X @ Ws[0].T + bs[0])
        return _sigmoid(a @ Ws[1].T + bs[1]), a, a > threshold
    if kind == "tanh":
        a = np.tanh(X @ Ws[0].T + bs[0])
        return a @ Ws[1].T + bs[1], a, (a + 1) / 2 > threshold
    if kind == "deep":
        a1 = _sigmoid(X @ Ws[0].T + bs[0])
        code = a1 @ Ws[1].T + bs[1]
        a3 = _sigmoid(code @ Ws[2].T + bs[2])
        return a3 @ Ws[3].T + bs[3], code, np.abs(code) > threshold
    W_dec = Ws[1] / np.linalg.norm(Ws[1], axis=0)
    z = (X - bs[1]) @ Ws[0].T + bs[0]
    f = np.maximum(z, 0)
    if kind == "topk":
        keep = np.zeros_like(f, dtype=bool)
        np.put_along_axis(keep, np.argsort(-z, axis=1)[:, : net.k], True, axis=1)
        f = np.where(keep, f, 0.0)
    return f @ W_dec.T + bs[1], f, f > 0


def _expected(kind: str, net, theta, X, threshold: float = 0.1) -> dict:
    """The metrics as numpy one-liners on the whole array."""
    R, _, act = _direct(kind, net, theta, X, threshold)
    xn, rn = np.linalg.norm(X, axis=1), np.linalg.norm(R, axis=1)
    both, some = (xn > 0) & (rn > 0), xn > 0
    fvu = ((X - R) ** 2).sum() / ((X - X.mean(axis=0)) ** 2).sum()
    return {
        "mse": np.mean((X - R) ** 2),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": act.sum(axis=1).mean(),
        "dead": int((~act.any(axis=0)).sum()),
        "dead_fraction": (~act.any(axis=0)).mean(),
        "density": act.mean(axis=0),
        "cosine": np.mean((X * R).sum(axis=1)[both] / (xn * rn)[both]),
        "shrinkage": np.mean(rn[some] / xn[some]),
        "examples": X.shape[0],
        "zero_norm_examples": int((~some).sum()),
        "zero_reconstructions": int((some & ~both).sum()),
    }


def _assert_metrics(got: dict, want: dict, rtol: float = 1e-12) -> None:
    for k, v in want.items():
        if k == "density":
            np.testing.assert_allclose(got[k], v, rtol=rtol, atol=0, err_msg=k)
        elif isinstance(v, int):
            assert got[k] == v, k
        else:
            np.testing.assert_allclose(got[k], v, rtol=rtol, atol=1e-15, err_msg=k)


def _data(m: int = 101, n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((m, n))


# ----------------------------------------------------------------------------- sae.metrics
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_match_a_direct_computation(kind):
    net, theta = _model(kind)
    X = _data()
    got = sm.array_metrics(net, theta, X)
    _assert_metrics(got, _expected(kind, net, theta, X))
    assert got["latents"] == net.sizes[sm.latent_layer(net)]
    assert got["latent_layer"] == (2 if kind == "deep" else 1)
    assert got["kind"] == net.kind
    if kind in ("relu-l1", "topk"):
        assert got["dead"] >= 1 and got["density"][0] == 0  # the latent with bias -100
        assert got["threshold"] is None and got["active"] == "a > 0"
    else:
        assert got["threshold"] == 0.1
    if kind == "topk":
        assert got["l0"] <= net.k


def test_explained_variance_is_sklearns_variance_weighted_r2_not_its_explained_variance():
    metrics = pytest.importorskip("sklearn.metrics")
    net, theta = _model("tanh")
    X = _data()
    R = _direct("tanh", net, theta, X)[0]
    got = sm.array_metrics(net, theta, X)
    r2 = metrics.r2_score(X, R, multioutput="variance_weighted")
    assert np.isclose(got["explained_variance"], r2, rtol=1e-12)
    # explained_variance_score averages per-feature 1 - Var(residual) / Var(x): another figure
    assert not np.isclose(got["explained_variance"], metrics.explained_variance_score(X, R))


@pytest.mark.parametrize("kind", KINDS)
def test_three_uneven_chunks_add_up_to_the_whole(kind):
    net, theta = _model(kind)
    X = _data(m=101)
    shift = X[0]
    parts = [
        sm.metric_sums(net, theta, X[a:b], shift=shift) for a, b in ((0, 7), (7, 57), (57, 101))
    ]
    total = obj.add_sums(obj.add_sums(parts[0], parts[1]), parts[2])
    whole = sm.metric_sums(net, theta, X, shift=shift)
    assert total.keys() == whole.keys()
    for k in whole:
        np.testing.assert_allclose(total[k], whole[k], rtol=1e-12, atol=1e-12, err_msg=k)
    got, want = sm.finalize_metrics(net, total), sm.finalize_metrics(net, whole)
    for k in SCALARS:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
    np.testing.assert_array_equal(got["density"], want["density"])


def test_fvu_is_precise_on_data_with_a_large_offset():
    """1000 + noise of standard deviation 0.01: the total variance from sum x and sum ||x||^2
    cancels 10 digits away; the sums of x minus a row of the data do not."""
    rng = np.random.default_rng(3)
    X = 1000.0 + 0.01 * rng.standard_normal((3000, 16))
    net = Dictionary.of("relu-l1", 16, 8)
    theta = net.init_theta(0, mean=X.mean(axis=0))
    R = _direct("relu-l1", net, theta, X)[0]
    err = ((X - R) ** 2).sum()
    want = err / (np.var(X, axis=0).sum() * X.shape[0])
    parts = [sm.metric_sums(net, theta, X[a : a + 1000], shift=X[0]) for a in (0, 1000, 2000)]
    total = obj.add_sums(obj.add_sums(parts[0], parts[1]), parts[2])
    assert np.isclose(sm.finalize_metrics(net, total)["fvu"], want, rtol=1e-12, atol=0)
    # without the shift (the plain sum of squares) the same data lose about 5 digits
    naive = sm.finalize_metrics(net, sm.metric_sums(net, theta, X))["fvu"]
    assert abs(naive / want - 1) > 1e-9


def test_threshold_is_an_argument_and_is_recorded():
    net, theta = _model("sigmoid")
    X = _data()
    for threshold in (0.0, 0.3, 0.9):
        got = sm.array_metrics(net, theta, X, threshold=threshold)
        _assert_metrics(got, _expected("sigmoid", net, theta, X, threshold))
        assert got["threshold"] == threshold and got["active"] == f"a > {threshold:g}"
    loose = sm.array_metrics(net, theta, X, threshold=0.0)["l0"]
    strict = sm.array_metrics(net, theta, X, threshold=0.9)["l0"]
    assert loose == 9 and strict < loose
    with pytest.raises(ValueError, match="^threshold:"):
        sm.array_metrics(net, theta, X, threshold=-1)


def test_zero_norms_are_skipped_and_counted():
    """A zero row is left out of cosine and shrinkage; a dictionary whose latents are all
    dead reconstructs b_dec = 0: no cosine at all."""
    X = _data(m=20)
    X[3] = 0
    net, theta = _model("relu-l1")
    got = sm.array_metrics(net, theta, X)
    _assert_metrics(got, _expected("relu-l1", net, theta, X))
    assert got["zero_norm_examples"] == 1
    Ws, bs = net.unpack(theta)
    bs[0][:] = -100.0
    bs[1][:] = 0.0
    dead = net.pack(Ws, bs)
    got = sm.array_metrics(net, dead, X)
    assert got["dead"] == got["latents"] and got["l0"] == 0
    assert got["cosine"] is None and got["zero_reconstructions"] == 19
    assert got["shrinkage"] == 0.0
    assert got["density_histogram"]["dead"] == got["latents"]


def test_constant_data_have_no_variance_to_explain():
    net, theta = _model("sigmoid")
    got = sm.array_metrics(net, theta, np.full((10, 16), 0.5))
    assert got["fvu"] is None and got["explained_variance"] is None and got["mse"] > 0


def test_a_model_of_another_output_size_is_refused():
    net = Network.autoencoder(16, 4, output_size=9)
    with pytest.raises(ValueError, match="^model: its output has 9 units"):
        sm.metric_sums(net, net.init_theta(0), _data())


def test_density_histogram_and_picture(tmp_path):
    density = np.concatenate([np.zeros(5), 10 ** np.linspace(-3.9, 0, 60)])
    hist = sm.density_histogram(density, examples=10_000)
    assert hist["dead"] == 5 and sum(hist["counts"]) == 60
    assert hist["log10_edges"][0] == -4.0 and hist["log10_edges"][-1] == 0.0
    assert len(hist["counts"]) == 4 * sm.BINS_PER_DECADE
    for d in (density, np.zeros(7), np.ones(7)):
        path = save_density_png(d, tmp_path / "density.png", examples=10_000)
        assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="^density:"):
        save_density_png(np.array([np.nan]), tmp_path / "x.png")


# ----------------------------------------------------------------------------- worker.evaluate
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, np.ndarray]:
    """1,234 x 16 rows in 21 chunks of 60 (the last of 34): a tree of two levels."""
    X = _data(m=1234, seed=5)
    path = tmp_path_factory.mktemp("metrics") / "ds"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=60, sample_shape=(4, 4))
    return str(path), X


def _same(a: dict, b: dict) -> None:
    """Bitwise the same metrics."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        elif k != "dataset":
            assert a[k] == b[k], k


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_in_process_streams_the_chunks(dataset, kind):
    path, X = dataset
    net, theta = _model(kind)
    seen = []
    got = evaluate(net, theta, path, on_chunk=seen.append)
    _assert_metrics(got, _expected(kind, net, theta, X), rtol=1e-11)
    assert seen == [60] * 20 + [34]
    assert got["n_chunks"] == 21 and got["chunks"] is None and got["dtype"] == "float64"
    rows = np.r_[60:120, 1200:1234]  # chunks 1 and 20
    held = evaluate(net, theta, path, chunks=[20, 1, 1])
    assert held["chunks"] == [1, 20] and held["examples"] == rows.size
    _assert_metrics(held, _expected(kind, net, theta, X[rows]), rtol=1e-11)


def test_evaluate_float32_is_close(dataset):
    path, X = dataset
    net, theta = _model("relu-l1")
    got = evaluate(net, theta, path, dtype="float32")
    want = _expected("relu-l1", net, theta, X)
    for k in ("mse", "fvu", "cosine", "shrinkage"):
        assert np.isclose(got[k], want[k], rtol=1e-5), k


def test_evaluate_refuses_bad_arguments(dataset, tmp_path):
    path, _ = dataset
    net, theta = _model("sigmoid")
    with pytest.raises(ValueError, match="^dataset: .* has 16 features but the model's input"):
        evaluate(*_model("sigmoid", n=9), path)
    with pytest.raises(ValueError, match="^chunks: chunk 21 is not one of the dataset's 0..20"):
        evaluate(net, theta, path, chunks=[21])
    with pytest.raises(ValueError, match="^chunks: give at least one"):
        evaluate(net, theta, path, chunks=[])
    with pytest.raises(ValueError, match="^dtype:"):
        evaluate(net, theta, path, dtype="float16")
    with pytest.raises(ValueError, match="^theta:"):
        evaluate(net, theta[:-1], path)
    with pytest.raises(ValueError, match="^dataset: no dataset at"):
        evaluate(net, theta, tmp_path / "nope")


@pytest.mark.bitwise
@pytest.mark.parametrize("kind", ["sigmoid", "topk"])
def test_same_bits_in_process_and_on_one_or_two_workers(two_workers, dataset, kind):
    from worker.cluster import get_client

    path, _ = dataset
    net, theta = _model(kind)
    local = evaluate(net, theta, path)
    _same(evaluate(net, theta, path, client=two_workers), local)
    held = evaluate(net, theta, path, chunks=[2, 5, 19])
    _same(evaluate(net, theta, path, client=two_workers, chunks=[2, 5, 19]), held)
    with get_client(workers=1, memory_limit="1GB") as (one, _):
        _same(evaluate(net, theta, path, client=one), local)


def test_write_and_read_metrics(tmp_path, dataset):
    path, _ = dataset
    net, theta = _model("topk")
    got = evaluate(net, theta, path)
    got["nan"] = float("nan")
    out = write_metrics(tmp_path / "job", got)
    assert out == tmp_path / "job" / layout.METRICS
    saved = json.loads(out.read_text())
    assert "density" not in saved and saved["nan"] is None
    assert saved["density_histogram"]["dead"] == got["dead"]
    assert {k: saved[k] for k in SCALARS} == {k: got[k] for k in SCALARS}
    assert (tmp_path / "job" / layout.DENSITY).read_bytes()[:8] == PNG
    assert read_metrics(tmp_path / "job") == saved
    assert read_metrics(tmp_path / "none") is None
    (tmp_path / "job" / layout.METRICS).write_text("{not json")
    assert read_metrics(tmp_path / "job") is None
    other = write_metrics(tmp_path / "cli", got, name="m.json")
    assert other.name == "m.json" and (tmp_path / "cli" / layout.DENSITY).is_file()


def test_evaluate_job_on_the_held_out_chunks(two_workers, dataset, tmp_path):
    from worker.batches import held_out_chunks
    from worker.spec import TrainSpec
    from worker.train import train

    path, X = dataset
    spec = TrainSpec(
        dataset=path,
        kind="topk",
        hidden=8,
        k=2,
        optimizer="adam",
        learning_rate=1e-2,
        batch_size=200,
        epochs=1,
        validation_fraction=0.2,
        seed=3,
    )
    root = tmp_path / "job"
    assert train(spec, root, client=two_workers).status == "succeeded"
    got = evaluate_job(root, client=two_workers)
    held = held_out_chunks(21, 0.2, 3)
    assert got["split"] == "held-out" and got["chunks"] == list(held)
    net, theta, _ = layout.load_model(root / layout.MODEL)
    rows = np.concatenate([np.arange(60 * i, min(60 * (i + 1), 1234)) for i in held])
    _assert_metrics(got, _expected("topk", net, theta, X[rows]), rtol=1e-11)
    assert read_metrics(root)["fvu"] == got["fvu"]
    assert (root / layout.DENSITY).read_bytes()[:8] == PNG
    _same(evaluate_job(root), got)  # in this process: the same bits


def test_evaluate_job_of_a_deep_job_on_all_chunks(two_workers, dataset, tmp_path):
    from worker.spec import TrainSpec
    from worker.train import train

    path, X = dataset
    spec = TrainSpec(dataset=path, hidden=[6, 3], max_iter=3, finetune_iter=3)
    root = tmp_path / "deep"
    assert train(spec, root, client=two_workers).status == "succeeded"
    got = evaluate_job(root)
    assert got["split"] == "all" and got["latent_layer"] == 2 and got["latents"] == 3
    net, theta, _ = layout.load_model(root / layout.MODEL)
    R = obj.forward(net, theta, X)[-1]
    assert np.isclose(got["mse"], np.mean((X - R) ** 2), rtol=1e-11)


def test_evaluate_job_without_a_model_is_none(tmp_path):
    assert evaluate_job(tmp_path) is None
    assert not (tmp_path / layout.METRICS).exists()


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def saved_model(tmp_path) -> tuple[Path, Network, np.ndarray]:
    net, theta = _model("relu-l1")
    (tmp_path / "job").mkdir()
    path = layout.save_model(tmp_path / "job" / layout.MODEL, net, theta, {})
    return path, net, theta


def test_cli_evaluate_prints_a_table_and_writes_the_files(dataset, saved_model, tmp_path):
    path, X = dataset
    model, net, theta = saved_model
    out = tmp_path / "out" / "m.json"
    res = CliRunner().invoke(
        sae_cli, ["evaluate", str(model.parent), path, "--out", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    want = _expected("relu-l1", net, theta, X)
    table = dict(line.split(None, 1) for line in lines[:-1])
    assert list(table) == [
        "model", "dataset", "examples", "mse", "fvu", "explained_variance", "l0", "dead",
        "cosine", "shrinkage", "active",
    ]  # fmt: skip
    assert len({line.index(line.split(None, 1)[1]) for line in lines[:-1]}) == 1  # aligned
    assert table["model"].startswith(f"{model} (relu-l1 16-12-16)")
    assert table["examples"] == "1234"
    assert float(table["mse"].split()[0]) == pytest.approx(want["mse"], rel=1e-5)
    assert float(table["fvu"]) == pytest.approx(want["fvu"], rel=1e-5)
    assert table["dead"].startswith(f"{want['dead']} of 12")
    assert lines[-1] == f"wrote {out} and {out.parent / layout.DENSITY}"
    saved = json.loads(out.read_text())
    assert saved["mse"] == pytest.approx(want["mse"], rel=1e-11)
    assert (out.parent / layout.DENSITY).read_bytes()[:8] == PNG


def test_cli_evaluate_defaults_to_metrics_json_here(dataset, saved_model, tmp_path, monkeypatch):
    path, _ = dataset
    model, _, _ = saved_model
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    runner = CliRunner()
    res = runner.invoke(sae_cli, ["evaluate", str(model), path, "-q", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert json.loads((here / layout.METRICS).read_text())["dtype"] == "float32"
    assert (here / layout.DENSITY).is_file()
    assert "current directory" in runner.invoke(sae_cli, ["evaluate", "--help"]).output


def test_cli_evaluate_on_a_scheduler_gives_the_same_numbers(two_workers, dataset, saved_model):
    path, _ = dataset
    model, net, theta = saved_model
    out = model.parent / "remote.json"
    address = two_workers.scheduler.address
    res = CliRunner().invoke(
        sae_cli, ["evaluate", str(model), path, "--scheduler", address, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    local = evaluate(net, theta, path)
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in SCALARS} == {k: local[k] for k in SCALARS}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope.npz", "{ds}"], "Error: MODEL: nope.npz is neither a model.npz nor a job folder"),
        (["{model}", "{tmp}/none"], "Error: DATASET: no dataset at {tmp}/none"),
        (
            ["{model9}", "{ds}"],
            "Error: DATASET: {ds} has 16 features but the model's input layer has 9 units",
        ),  # fmt: skip
        (["{model}", "{ds}", "--scheduler", "tcp://127.0.0.1:9"], "Error: --scheduler: "),
    ],
)
def test_cli_evaluate_errors_name_the_argument(
    dataset, saved_model, tmp_path, monkeypatch, args, message
):
    monkeypatch.setattr("worker.cluster.CONNECT_TIMEOUT", 0.5)  # no scheduler at port 9
    path, _ = dataset
    model, _, _ = saved_model
    net9, theta9 = _model("sigmoid", n=9)
    model9 = layout.save_model(tmp_path / "m9.npz", net9, theta9, {})
    fill = {"ds": path, "model": str(model), "model9": str(model9), "tmp": str(tmp_path)}
    argv = ["evaluate", *(a.format(**fill) for a in args), "--out", str(tmp_path / "x.json")]
    res = CliRunner().invoke(sae_cli, argv)
    assert res.exit_code == 2, res.output
    assert res.output.startswith(message.format(**fill)), res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(not MNIST.exists(), reason=f"real MNIST absent ({MNIST})")
def test_cli_evaluate_on_real_mnist(tmp_path):
    from sae.mnist import load_idx
    from worker.array_files import ingest_idx

    ingest_idx(MNIST, tmp_path / "mnist", chunk_rows=3000)
    X = load_idx(MNIST).reshape(10000, 784) / 255.0
    net = Dictionary.of("topk", 784, 64, k=8)
    theta = net.init_theta(0, mean=X.mean(axis=0))
    model = layout.save_model(tmp_path / "model.npz", net, theta, {})
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(
        sae_cli, ["evaluate", str(model), str(tmp_path / "mnist"), "--out", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    assert "examples            10000" in res.output
    got = json.loads(out.read_text())
    _assert_metrics(
        {k: got[k] for k in SCALARS},
        {k: v for k, v in _expected("topk", net, theta, X).items() if k in SCALARS},
        rtol=1e-10,
    )
    assert got["n_chunks"] == 4 and 0 < got["l0"] <= 8


# ----------------------------------------------------------------------------- the service
def test_job_status_and_artifacts_show_the_metrics(tmp_path):
    from tests.service_fixtures import Server, wait_job, write_tiny

    write_tiny(tmp_path / "data", "tiny")
    token = "metrics-token"
    with Server(tmp_path / "data", tmp_path / "state", token=token) as srv, srv.client() as http:
        job_id = http.post("/jobs", json={"dataset": "tiny", "hidden": 4, "max_iter": 3}).json()[
            "id"
        ]
        job = wait_job(http, job_id)
        assert job["status"] == "succeeded"
        assert job["links"]["metrics"] == f"/jobs/{job_id}/metrics.json"
        assert job["links"]["density"] == f"/jobs/{job_id}/density.png"
        root = srv.state_dir / "jobs" / job_id
        for name in (layout.METRICS, layout.DENSITY):  # as before the job was evaluated
            (root / name).unlink(missing_ok=True)
        assert http.get(f"/jobs/{job_id}").json()["metrics"] is None
        r = http.get(f"/jobs/{job_id}/metrics.json")
        assert r.status_code == 404 and r.json()["detail"] == "metrics.json: not written yet"
        assert http.get(f"/jobs/{job_id}/density.png").status_code == 404

        metrics = evaluate_job(root)
        job = http.get(f"/jobs/{job_id}").json()
        for k in ("mse", "fvu", "explained_variance", "l0", "dead", "cosine", "shrinkage"):
            assert job["metrics"][k] == metrics[k], k
        assert job["metrics"]["split"] == "all" and job["metrics"]["examples"] == 200
        assert "density" not in job["metrics"]
        listed = http.get("/jobs").json()["items"]
        assert [j["metrics"]["mse"] for j in listed if j["id"] == job_id] == [metrics["mse"]]
        r = http.get(f"/jobs/{job_id}/metrics.json")
        assert r.status_code == 200 and r.json() == json.loads((root / layout.METRICS).read_text())
        with srv.client(token=None) as anonymous:  # pictures take ?token= (for img tags)
            assert anonymous.get(f"/jobs/{job_id}/density.png").status_code == 401
            r = anonymous.get(f"/jobs/{job_id}/density.png", params={"token": token})
        assert r.status_code == 200 and r.content[:8] == PNG
        (root / layout.METRICS).write_text('{"mse": "not a number"}')
        assert http.get(f"/jobs/{job_id}").json()["metrics"] is None  # never a 500
