"""Deep autoencoders: the stacked objective's gradient, the plan's networks and initialisations,
greedy pretraining in memory, and bad specs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sae
from sae.deep import (
    DeepArchitecture,
    encode,
    pca_reconstruction_error,
    pretrain_and_finetune,
    reconstruct,
    stage_data,
    validate_sizes,
)
from sae.gradcheck import check_gradient


def _data(m: int, n: int, seed: int = 0, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size=(m, n))


# ------------------------------------------------------------------ gradient of the stack
HIDDEN = {1: (5,), 2: (5, 3), 3: (6, 4, 3)}


def _unrolled_cases():
    """(depth, activation, code, output, sparse); sparsity only where a layer can carry it
    (linear units have no sparsity target)."""
    acts = [
        ("sigmoid", None, None),
        ("tanh", None, None),
        ("sigmoid", "linear", None),
        ("tanh", "linear", "linear"),
        ("linear", None, None),
    ]
    for depth in (1, 2, 3):
        for activation, code, output in acts:
            for sparse in (False, True):
                if sparse and (activation == "linear" or (depth == 1 and code == "linear")):
                    continue
                yield depth, activation, code, output, sparse


@pytest.mark.parametrize("depth,activation,code,output,sparse", list(_unrolled_cases()))
def test_gradient_of_unrolled_network(depth, activation, code, output, sparse):
    """Central differences agree with backprop through the whole unrolled stack (2, 4 and 6
    layers), for every activation, with and without sparsity on every bounded encoder layer."""
    plan = DeepArchitecture(
        7,
        HIDDEN[depth],
        activation=activation,
        code_activation=code,
        output_activation=output,
        lam=1e-3,
        rho=0.2 if sparse else None,
        beta=0.5,
        finetune_sparse=sparse,
    )
    net = plan.network()
    assert net.n_layers == 2 * depth
    if sparse:
        assert net.sparse_layers  # at least one sparse layer is checked
    X = _data(10, 7, seed=depth) * (2 if (output or activation) != "sigmoid" else 1)
    theta = net.init_theta(seed=depth) + 0.01
    for passes in ("two",) + (("fused",) if net.sparse_layers in ((), (1,)) else ()):
        diff = check_gradient(
            lambda t, p=passes: sae.cost(net, t, X, passes=p), theta, epsilon=1e-5
        )
        assert diff < 1e-9, (passes, diff)


@pytest.mark.parametrize("pretrain", ["previous", "input"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_of_stage_objective(pretrain, k):
    """Each stage's objective (input = lower codes, target = codes or x) has an exact gradient."""
    plan = DeepArchitecture(
        7, (6, 4, 3), code_activation="linear", lam=1e-3, rho=0.1, beta=3.0, pretrain=pretrain
    )
    X = _data(12, 7, seed=k)
    rng = np.random.default_rng(1)
    thetas = [plan.stage_network(j).init_theta(j) + rng.normal(0, 0.1) for j in range(1, k)]
    A, Y = stage_data(plan, thetas, k, X)
    sn = plan.stage_network(k)
    assert A.shape == (12, plan.encoder_sizes[k - 1])
    if pretrain == "input" and k > 1:
        assert Y is X and sn.sizes[-1] == 7
    else:
        assert Y is None and sn.sizes[-1] == sn.sizes[0]
    diff = check_gradient(lambda t: sae.cost(sn, t, A, Y), sn.init_theta(k) + 0.01, epsilon=1e-5)
    assert diff < 1e-9


# ------------------------------------------------------------------ architecture
def test_unrolled_network_layout():
    plan = DeepArchitecture(784, (1000, 500, 250, 30), code_activation="linear", rho=0.1, beta=3.0)
    net = plan.network()
    assert net.sizes == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert net.activations == ("sigmoid",) * 3 + ("linear",) + ("sigmoid",) * 4
    assert net.sparse_layers == ()  # no sparsity in fine-tuning by default
    assert plan.rho == (0.1, 0.1, 0.1, None)  # no target for linear code units
    s2 = plan.stage_network(2)
    assert s2.sizes == (1000, 500, 1000) and s2.sparse_layers == (1,)
    s4 = plan.stage_network(4)
    assert s4.sizes == (250, 30, 250) and s4.activations == ("linear", "sigmoid")
    assert s4.sparse_layers == ()
    s4x = DeepArchitecture(784, (1000, 500, 250, 30), pretrain="input", output_activation="linear")
    assert s4x.stage_network(4).sizes == (250, 30, 784)
    assert s4x.stage_network(4).activations == ("sigmoid", "linear")
    sparse_ft = DeepArchitecture(784, (100, 30), rho=0.1, beta=3.0, finetune_sparse=(True, False))
    assert sparse_ft.network().sparse_layers == (1,)


# ------------------------------------------------------------------ initialisations
def _trained_like(plan: DeepArchitecture, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=plan.stage_network(k).n_params) for k in range(1, plan.n_stages + 1)]


@pytest.mark.parametrize("pretrain", ["previous", "input"])
def test_transposed_init_is_the_transpose(pretrain):
    plan = DeepArchitecture(9, (7, 5, 3), pretrain=pretrain, decoder_init="transpose")
    stages = _trained_like(plan)
    net = plan.network()
    Ws, bs = net.unpack(plan.assemble(stages))
    K = plan.K
    for k in range(1, K + 1):
        (W1, W2), (b1, b2) = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[k - 1], W1)
        np.testing.assert_array_equal(bs[k - 1], b1)
        np.testing.assert_array_equal(Ws[2 * K - k], W1.T)  # W_dec = W_enc^T exactly
        if pretrain == "previous" or k == 1:
            np.testing.assert_array_equal(bs[2 * K - k], b2)
        else:
            np.testing.assert_array_equal(bs[2 * K - k], 0.0)


def test_pretrained_init_uses_stage_decoders():
    plan = DeepArchitecture(9, (7, 5, 3), pretrain="previous", decoder_init="pretrained")
    stages = _trained_like(plan, 1)
    Ws, bs = plan.network().unpack(plan.assemble(stages))
    for k in range(1, 4):
        (W1, W2), (b1, b2) = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[k - 1], W1)
        np.testing.assert_array_equal(Ws[6 - k], W2)
        np.testing.assert_array_equal(bs[6 - k], b2)
    # "input" target: stage 1's decoder is the output layer; inner decoders are transposes
    plan = DeepArchitecture(9, (7, 5, 3), pretrain="input", decoder_init="pretrained")
    stages = _trained_like(plan, 2)
    Ws, bs = plan.network().unpack(plan.assemble(stages))
    (W1, W2), (b1, b2) = plan.stage_network(1).unpack(stages[0])
    np.testing.assert_array_equal(Ws[5], W2)
    np.testing.assert_array_equal(bs[5], b2)
    for k in (2, 3):
        (W1, _), _ = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[6 - k], W1.T)
        np.testing.assert_array_equal(bs[6 - k], 0.0)


def test_no_pretraining_is_random_init():
    plan = DeepArchitecture(9, (7, 3), pretrain="none")
    assert plan.n_stages == 0
    np.testing.assert_array_equal(plan.assemble([], seed=3), plan.network().init_theta(3))
    tied = DeepArchitecture(9, (7, 3), pretrain="none", decoder_init="transpose")
    Ws, _ = tied.network().unpack(tied.assemble([], seed=3))
    np.testing.assert_array_equal(Ws[3], Ws[0].T)
    np.testing.assert_array_equal(Ws[2], Ws[1].T)


# ------------------------------------------------------------------ pretraining in memory
@pytest.mark.parametrize("pretrain", ["previous", "input"])
def test_each_pretraining_target_reduces_its_stage_cost(pretrain):
    X = _data(60, 16, seed=5)
    plan = DeepArchitecture(
        16, (10, 6, 3), code_activation="linear", lam=1e-4, rho=0.1, beta=0.5, pretrain=pretrain
    )
    res = pretrain_and_finetune(plan, X, max_iter=30, finetune_iter=30)
    assert len(res.stage_thetas) == 3
    for k in range(1, 4):
        hist = res.histories[f"pretrain {k}/3"]
        assert hist[-1] < 0.9 * hist[0], (k, hist[0], hist[-1])
        # the recorded final cost is the stage objective at the returned parameters
        A, Y = stage_data(plan, res.stage_thetas, k, X)
        J, _ = sae.cost(plan.stage_network(k), res.stage_thetas[k - 1], A, Y)
        assert J == pytest.approx(hist[-1], rel=1e-12)
    ft = res.histories["finetune"]
    assert ft[-1] < ft[0]
    assert sae.cost(res.net, res.start_theta, X)[0] == pytest.approx(ft[0], rel=1e-12)


def test_encode_and_reconstruct_shapes():
    plan = DeepArchitecture(9, (7, 5, 3), code_activation="linear")
    net = plan.network()
    theta = net.init_theta(0)
    X = _data(4, 9)
    assert encode(net, theta, X).shape == (4, 3)
    assert encode(net, theta, X, layer=1).shape == (4, 7)
    assert reconstruct(net, theta, X).shape == (4, 9)
    one = sae.Network.autoencoder(9, 4)
    assert encode(one, one.init_theta(0), X).shape == (4, 4)
    with pytest.raises(ValueError, match="layer"):
        encode(net, theta, X, layer=7)


def test_pca_baseline_matches_projection():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    err = pca_reconstruction_error(X, X, 6)
    assert np.all(err < 1e-9)  # all components: exact
    err2 = pca_reconstruction_error(X, X, 2)
    assert err2.mean() > 0


# ------------------------------------------------------------------ bad specs
@pytest.mark.parametrize(
    "n_visible,hidden,stages,field",
    [
        (10, [], None, "hidden"),
        (10, [5, 0], None, "hidden"),
        (10, [5, -3], None, "hidden"),
        (10, [20, 12], None, "hidden"),  # code layer larger than the input
        (10, [5, 3], 3, "stages"),
        (10, [5, 3], -1, "stages"),
    ],
)
def test_bad_sizes_are_named(n_visible, hidden, stages, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        validate_sizes(n_visible, hidden, stages)
    with pytest.raises(ValueError, match=f"^{field}:"):
        DeepArchitecture(n_visible, tuple(hidden), stages=stages)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="^pretrain:"):
        DeepArchitecture(10, (5, 3), pretrain="both")
    with pytest.raises(ValueError, match="^decoder_init:"):
        DeepArchitecture(10, (5, 3), decoder_init="mirror")
    with pytest.raises(ValueError, match="^rho:"):
        DeepArchitecture(10, (5, 3), code_activation="linear", rho=(0.1, 0.1))
    with pytest.raises(ValueError, match="activation"):
        DeepArchitecture(10, (5, 3), activation="swish")
    # an overcomplete first layer is fine; only the code must not exceed the input
    DeepArchitecture(10, (20, 5))


# ------------------------------------------------------------------ on the cluster
@pytest.fixture(scope="module")
def digits_like(tmp_path_factory) -> tuple[str, np.ndarray]:
    """600 examples of 16 features in [0.05, 0.95] with low-dimensional structure."""
    rng = np.random.default_rng(11)
    Z = rng.normal(size=(600, 3))
    X = 1 / (1 + np.exp(-(Z @ rng.normal(size=(3, 16)) + 0.3 * rng.normal(size=(600, 16)))))
    X = 0.05 + 0.9 * X
    from worker.dataset import write_dataset

    path = tmp_path_factory.mktemp("deep") / "ds"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100, sample_shape=(4, 4))
    return str(path), X


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("passes", ["two", "fused"])
def test_distributed_deep_objective_equals_in_memory(two_workers, digits_like, passes):
    from worker.engine import DistributedObjective

    path, X = digits_like
    sparse = (True, False, False) if passes == "fused" else (True, True, False)
    plan = DeepArchitecture(
        16,
        (10, 6, 3),
        code_activation="linear",
        lam=1e-3,
        rho=0.2,
        beta=0.5,
        finetune_sparse=sparse,
    )
    net = plan.network()
    theta = net.init_theta(4) + 0.01
    f = DistributedObjective(two_workers, path, net, passes=passes, job="deep-eq")
    J, g = f(theta)
    J0, g0 = sae.cost(net, theta, X, passes=passes)
    assert J == pytest.approx(J0, rel=1e-12) and _rel(g, g0) < 1e-12
    # each stage of both targets: inputs from the frozen encoders, computed in the tasks
    for pretrain in ("previous", "input"):
        p = DeepArchitecture(
            16, (10, 6, 3), code_activation="linear", lam=1e-3, rho=0.2, beta=0.5, pretrain=pretrain
        )
        thetas = [p.stage_network(j).init_theta(j) + 0.02 for j in (1, 2)]
        sn = p.stage_network(3)
        th = sn.init_theta(5)
        fs = DistributedObjective(
            two_workers,
            path,
            sn,
            passes=passes,
            encoder=p.stage_encoder(thetas, 3),
            target=p.stage_target(3),
            job="deep-stage",
        )
        A, Y = stage_data(p, thetas, 3, X)
        Js, gs = fs(th)
        Js0, gs0 = sae.cost(sn, th, A, Y, passes=passes)
        assert Js == pytest.approx(Js0, rel=1e-12) and _rel(gs, gs0) < 1e-12


def _sae_optimize(f, theta0, max_iter):
    """The minimizer run_stage uses (sae.optimize L-BFGS), recording J per iteration."""
    from sae.optimize import OptimizerState, minimize

    hist = []
    from worker.schedule import DEEP_LS_MAXITER

    state = minimize(
        f,
        OptimizerState.start("lbfgs", theta0, {"ls_maxiter": DEEP_LS_MAXITER}),
        max_iter,
        lambda st: hist.append(float(st.J)) and False,
    )
    return state.theta, hist


def _deep_spec(path, **kw):
    from worker.spec import TrainSpec

    base = dict(
        dataset=path,
        hidden=[8, 4],
        code_activation="linear",
        lam=1e-4,
        rho=0.1,
        beta=0.5,
        max_iter=6,
        finetune_iter=6,
        seed=2,
    )
    base.update(kw)
    return TrainSpec(**base)


@pytest.mark.parametrize("pretrain", ["previous", "input"])
def test_train_deep_outputs_and_reference(two_workers, digits_like, tmp_path, pretrain):
    """The distributed pipeline writes every stage as a job and follows the in-memory
    reference (same optimizer) stage by stage."""
    from worker.layout import load_model
    from worker.train import train

    path, X = digits_like
    spec = _deep_spec(path, pretrain=pretrain)
    seen = []
    res = train(spec, tmp_path / "job", client=two_workers, on_iteration=seen.append)
    out = tmp_path / "job"
    assert res.status == "succeeded" and res.execution == "local"  # small data: next to them
    hist = json.loads((out / "history.json").read_text())
    names = ["pretrain 1/2", "pretrain 2/2", "finetune"]
    assert [e["stage"] for e in hist] == [n for n in names for _ in range(7)]
    assert [e["stage"] for e in seen] == [e["stage"] for e in hist]
    for n, d in zip(names, ["stage-1", "stage-2", "finetune"], strict=True):
        stage_hist = json.loads((out / d / "history.json").read_text())
        assert stage_hist == [e for e in hist if e["stage"] == n]
        assert (out / d / "state.npz").exists() and (out / d / "model.npz").exists()
    assert (out / "filters.png").exists() and (out / "cost.png").exists()
    net, theta, meta = load_model(out / "model.npz")
    assert net.sizes == (16, 8, 4, 8, 16)
    assert net.activations == ("sigmoid", "linear", "sigmoid", "sigmoid")
    assert meta["network"]["activations"] == list(net.activations)
    with np.load(out / "model.npz") as npz:
        Ws, bs = net.unpack(theta)
        for l in range(1, 5):
            np.testing.assert_array_equal(npz[f"W{l}"], Ws[l - 1])
            np.testing.assert_array_equal(npz[f"b{l}"], bs[l - 1])
    # the in-memory reference with the same optimizer
    plan = DeepArchitecture(
        16, (8, 4), code_activation="linear", lam=1e-4, rho=0.1, beta=0.5, pretrain=pretrain
    )
    ref = pretrain_and_finetune(plan, X, 6, 6, seed=2, minimizer=_sae_optimize)
    for n in names:
        got = [e["cost"] for e in hist if e["stage"] == n]
        np.testing.assert_allclose(got, ref.histories[n], rtol=1e-8)
        assert got[-1] < got[0]
    assert _rel(theta, ref.theta) < 1e-6


@pytest.mark.bitwise
@pytest.mark.parametrize("execution", ["distributed", "local"])
def test_resume_in_the_middle_of_a_stage(two_workers, digits_like, tmp_path, execution):
    """Stopped in stage 2, resumed: stage 1 is not rerun and the result is bitwise that of
    the uninterrupted job, whether the stages run in the driver or as tasks next to the data.

    In the driver the stop lands after iteration 3 of stage 2. A task learns of it by polling,
    so there the stop is asked once stage 1 has ended: stage 2 stops before it evaluates."""
    from worker.layout import load_model
    from worker.train import train

    path, _ = digits_like
    spec = _deep_spec(path, pretrain="input", decoder_init="transpose")
    full = train(spec, tmp_path / "full", client=two_workers, execution=execution)
    assert full.status == "succeeded" and full.execution == execution
    stop = [False]
    at = ("pretrain 2/2", 3) if execution == "distributed" else ("pretrain 1/2", spec.max_iter)

    def on_it(e):
        stop[0] = stop[0] or (e["stage"], e["iteration"]) == at

    out = tmp_path / "cut"
    cut = train(
        spec,
        out,
        client=two_workers,
        on_iteration=on_it,
        should_stop=lambda: stop[0],
        execution=execution,
    )
    assert cut.status == "cancelled" and cut.message.startswith("pretrain 2/2: ")
    assert (out / "stage-1" / "done.json").exists() and not (out / "stage-2" / "done.json").exists()
    s1 = (out / "stage-1" / "state.npz").stat().st_mtime_ns
    stop[0] = False
    seen = []
    res = train(
        spec, out, client=two_workers, resume=True, on_iteration=seen.append, execution=execution
    )
    assert res.status == "succeeded"
    assert (out / "stage-1" / "state.npz").stat().st_mtime_ns == s1  # stage 1 skipped
    first = 4 if execution == "distributed" else 0
    assert seen[0]["stage"] == "pretrain 2/2" and seen[0]["iteration"] == first
    a, b = load_model(full.model_path)[1], load_model(res.model_path)[1]
    np.testing.assert_array_equal(a, b)
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((out / "history.json").read_text())
    assert [(e["stage"], e["iteration"], e["cost"]) for e in ha] == [
        (e["stage"], e["iteration"], e["cost"]) for e in hb
    ]


def test_deep_spec_errors(two_workers, digits_like, tmp_path):
    from pydantic import ValidationError

    from worker.schedule import deep_architecture
    from worker.spec import TrainSpec
    from worker.train import train

    path, _ = digits_like
    with pytest.raises(ValueError, match="^hidden: the code layer"):
        train(_deep_spec(path, hidden=[20, 17]), tmp_path / "x", client=two_workers)
    with pytest.raises(ValidationError, match="hidden"):
        TrainSpec(dataset=path, hidden=[])
    with pytest.raises(ValidationError, match="hidden"):
        TrainSpec(dataset=path, hidden=[8, 0])

    with pytest.raises(ValueError, match="^stages:"):  # more stages than layers
        deep_architecture(TrainSpec(dataset=path, hidden=[8, 4], stages=3), 16)


# ------------------------------------------------------------------ sae encode / reconstruct
@pytest.mark.parametrize("hidden", [(5,), (10, 6, 3)])
def test_cli_encode_and_reconstruct(digits_like, tmp_path, hidden):
    from click.testing import CliRunner

    from service.cli import main
    from worker.layout import save_model

    path, X = digits_like
    if len(hidden) == 1:
        net = sae.Network.autoencoder(16, 5)
    else:
        net = DeepArchitecture(16, hidden, code_activation="linear").network()
    theta = net.init_theta(7) + 0.05
    save_model(tmp_path / "model.npz", net, theta, {"note": "test"})
    run = CliRunner().invoke
    r = run(
        main,
        [
            "encode",
            str(tmp_path / "model.npz"),
            path,
            str(tmp_path / "c.npy"),
            "-q",
            "--dtype",
            "float64",
        ],
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), encode(net, theta, X), rtol=1e-12)
    r = run(main, ["encode", str(tmp_path), path, str(tmp_path / "c1.npy"), "--layer", "1", "-q"])
    assert r.exit_code == 0, r.output
    c1 = np.load(tmp_path / "c1.npy")
    assert c1.dtype == np.float32
    np.testing.assert_allclose(c1, encode(net, theta, X, layer=1), rtol=1e-6)
    r = run(main, ["reconstruct", str(tmp_path), path, str(tmp_path / "r.npy"), "-q"])
    assert r.exit_code == 0, r.output
    R = reconstruct(net, theta, X)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), R, rtol=1e-6)
    err = float(((R - X) ** 2).sum(axis=1).mean())
    assert f"{err:.6g}" in r.output
    # a .npy dataset streams the same way
    np.save(tmp_path / "x.npy", X)
    r = run(
        main,
        [
            "encode",
            str(tmp_path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "c2.npy"),
            "-q",
            "--dtype",
            "float64",
        ],
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "c2.npy"), np.load(tmp_path / "c.npy"))
    # clear errors
    r = run(main, ["encode", str(tmp_path), path, str(tmp_path / "e.npy"), "--layer", "9"])
    assert r.exit_code != 0 and "--layer" in r.output
    r = run(main, ["encode", str(tmp_path / "nope"), path, str(tmp_path / "e.npy")])
    assert r.exit_code != 0 and "MODEL" in r.output
    np.save(tmp_path / "narrow.npy", X[:, :10])
    r = run(
        main, ["reconstruct", str(tmp_path), str(tmp_path / "narrow.npy"), str(tmp_path / "e.npy")]
    )
    assert r.exit_code != 0 and "10 features" in r.output
    assert not (tmp_path / "e.npy").exists()
    assert not list(tmp_path.glob(".e.npy*"))


def test_train_deep_without_pretraining(two_workers, digits_like, tmp_path):
    """pretrain="none": one fine-tuning stage from the random init of the unrolled network."""
    from worker.layout import load_model
    from worker.train import train

    path, X = digits_like
    spec = _deep_spec(path, pretrain="none", finetune_iter=4)
    res = train(spec, tmp_path / "none", client=two_workers)
    hist = json.loads((tmp_path / "none" / "history.json").read_text())
    assert res.status == "succeeded" and {e["stage"] for e in hist} == {"finetune"}
    assert not list((tmp_path / "none").glob("stage-*"))
    plan = DeepArchitecture(16, (8, 4), code_activation="linear", lam=1e-4, pretrain="none")
    J0, _ = sae.cost(plan.network(), plan.random_theta(2), X)
    assert hist[0]["cost"] == pytest.approx(J0, rel=1e-12)
    assert hist[-1]["cost"] < hist[0]["cost"]
    net, _, meta = load_model(res.model_path)
    assert net.sizes == (16, 8, 4, 8, 16) and meta["deep"]["pretrain"] == "none"


@pytest.mark.bitwise
def test_resume_reads_finished_stages_from_their_fsynced_state(two_workers, digits_like, tmp_path):
    """model.npz of a finished stage is written without fsync: after a power loss it may be
    stale or torn. Resume takes the parameters from state.npz (fsynced before done.json),
    and names the files when neither can be read."""
    from worker.job import CheckpointError
    from worker.layout import load_model, save_model
    from worker.train import train

    path, _ = digits_like
    spec = _deep_spec(path, max_iter=4, finetune_iter=3)
    out = tmp_path / "job"
    full = train(spec, out, client=two_workers)
    assert full.status == "succeeded"
    want = load_model(full.model_path)[1]
    stage_dirs = [out / "stage-1", out / "stage-2", out / "finetune"]
    for d in stage_dirs:  # stale model.npz (as if the last write was lost)
        net, theta, meta = load_model(d / "model.npz")
        save_model(d / "model.npz", net, np.zeros_like(theta), meta)
    (out / "stage-1" / "model.npz").write_bytes(b"torn")
    res = train(spec, out, client=two_workers, resume=True)
    assert res.status == "succeeded"
    np.testing.assert_array_equal(load_model(res.model_path)[1], want)
    # Without a readable state, model.npz is the fallback ...
    net, _, meta = load_model(out / "finetune" / "model.npz")
    save_model(out / "finetune" / "model.npz", net, want + 1.0, meta)
    (out / "finetune" / "state.npz").write_bytes(b"torn")
    res = train(spec, out, client=two_workers, resume=True)
    np.testing.assert_array_equal(load_model(res.model_path)[1], want + 1.0)
    # ... and when neither is readable, the error names them.
    (out / "stage-1" / "state.npz").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="model.npz") as err:
        train(spec, out, client=two_workers, resume=True)
    assert "stage-1" in str(err.value) and "state.npz" in str(err.value)
