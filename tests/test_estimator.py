"""The scikit-learn estimator: scikit-learn's own checks, the formulas of its methods per model
kind, its parameters as the spec's fields, and one seam for in-memory arrays, Zarr datasets and
Dask arrays that trains the job ``sae train`` trains (the same bits)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import check_estimator

from sae import objective as obj
from worker.dataset import write_dataset
from worker.estimator import AUTO_FIELDS, SPEC_FIELDS, SparseAutoencoder
from worker.layout import load_model
from worker.schedule import build_network
from worker.spec import TrainSpec
from worker.train import train

#: adam and sgd refuse a batch larger than the data, naming batch_size, in words that
#: check_fit2d_1sample does not look for ("1 sample", "n_samples = 1", ...)
_ONE_SAMPLE = {
    "check_fit2d_1sample": "adam/sgd: a batch_size larger than the training rows is a "
    "ValueError naming batch_size, not one of the messages the check expects"
}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize(
    "params, expected_failed",
    [
        # rho=None and linear outputs: scikit-learn's checks feed data of any scale and sign
        # (e.g. centred at 100), on which sigmoid units with a sparsity target saturate
        (dict(hidden=3, max_iter=15, rho=None, output_activation="linear"), None),
        (dict(kind="topk", hidden=4, k=2, max_iter=15), None),
        (
            dict(hidden=3, rho=None, output_activation="linear", optimizer="adam")
            | dict(learning_rate=0.01, batch_size=8, epochs=2),
            _ONE_SAMPLE,
        ),
    ],
    ids=["lbfgs", "topk", "adam"],
)
def test_scikit_learn_checks_pass(params, expected_failed):
    check_estimator(SparseAutoencoder(**params), expected_failed_checks=expected_failed)


def test_parameters_are_the_spec_fields():
    defaults = {
        name: p.default for name, p in inspect.signature(SparseAutoencoder).parameters.items()
    }
    for name in SPEC_FIELDS:  # the spec's defaults, or "auto": the kind's
        want = "auto" if name in AUTO_FIELDS else TrainSpec.model_fields[name].default
        assert defaults[name] == want, name
    assert SparseAutoencoder()._spec("x") == TrainSpec(dataset="x")
    topk = SparseAutoencoder(kind="topk", hidden=np.int64(8), k=np.int64(3))  # a grid's values
    assert topk._spec("x") == TrainSpec(dataset="x", kind="topk", hidden=8, k=3)
    assert (topk._spec("x").lam, topk._spec("x").rho, topk._spec("x").activation) == (
        0.0,
        None,
        "relu",
    )


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(kind="relu-l1", k=3), "k"),
        (dict(kind="topk", k=3, rho=0.05), "rho"),
        (dict(kind="topk", k=3, l1=0.1), "l1"),
        (dict(kind="topk"), "k"),
        (dict(kind="topk", k=9), "k"),
        (dict(kind="relu-l1", activation="sigmoid"), "activation"),
        (dict(early_stopping=3, optimizer="adam"), "early_stopping"),
        (dict(optimizer="adam", batch_size=500), "batch_size"),
        (dict(validation_fraction=0.5), "validation_fraction"),
        (dict(optimizer="sgd", momentum=1.5), "momentum"),
        (dict(chunk_rows=0), "chunk_rows"),
    ],
)
def test_bad_parameters_fail_at_fit_naming_the_parameter(params, name):
    X = np.random.default_rng(0).random((40, 6))
    est = SparseAutoencoder(**{"hidden": 8, "rho": None, **params})  # stored, not checked
    assert est.get_params()[name] == params.get(name)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        est.fit(X)


def test_methods_follow_the_notes_formulas():
    X = np.random.default_rng(0).random((120, 9))
    est = SparseAutoencoder(hidden=4, rho=0.1, beta=1.0, lam=1e-3, max_iter=30).fit(X)
    H = _sigmoid(X @ est.W1_.T + est.b1_)
    np.testing.assert_allclose(est.transform(X), H, rtol=1e-12)
    R = _sigmoid(H @ est.W2_.T + est.b2_)
    np.testing.assert_allclose(est.inverse_transform(H), R, rtol=1e-12)
    assert est.score(X) == pytest.approx(-0.5 * np.mean(np.sum((R - X) ** 2, axis=1)), rel=1e-12)
    net = build_network(est._spec("x"), 9)
    theta = net.pack([est.W1_, est.W2_], [est.b1_, est.b2_])
    assert est.loss_ == pytest.approx(obj.cost(net, theta, X)[0], rel=1e-12)
    assert est.n_iter_ == 30 and est.n_features_in_ == 9
    # it learned: the cost fell from the initial weights' cost
    assert est.loss_ < obj.cost(net, net.init_theta(0), X)[0]
    mse = np.mean((R - X) ** 2)  # per element, on all the rows
    assert est.metrics_["mse"] == pytest.approx(mse, rel=1e-10)
    assert est.metrics_["split"] == "all" and est.metrics_["examples"] == 120
    # in a pipeline, cloned
    pipe = make_pipeline(MinMaxScaler(), clone(est))
    assert pipe.fit_transform(X * 50 - 7).shape == (120, 4)
    with pytest.raises(ValueError, match="output_activation"):
        SparseAutoencoder(max_iter=2).fit(X * 3)  # sigmoid outputs cannot reach 3


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_dictionary_kinds(optimizer):
    X = np.random.default_rng(2).standard_normal((200, 10)) + 3.0
    fit = dict(optimizer=optimizer, max_iter=20, learning_rate=0.01, batch_size=50, epochs=2)
    topk = SparseAutoencoder(kind="topk", hidden=12, k=3, k_aux=4, **fit).fit(X)
    relu = SparseAutoencoder(kind="relu-l1", hidden=12, l1=0.05, **fit).fit(X)
    for est in (topk, relu):
        np.testing.assert_allclose(np.linalg.norm(est.W2_, axis=0), 1.0, rtol=1e-12)
        Z = (X - est.b2_) @ est.W1_.T + est.b1_  # the pre-encoder bias is b_dec
        F = est.transform(X)
        np.testing.assert_allclose(F[F > 0], Z[F > 0], rtol=1e-12)
        assert np.all(F[F == 0] == 0) and np.all(Z[F > 0] > 0)
        R = F @ est.W2_.T + est.b2_  # a linear decoder
        np.testing.assert_allclose(est.inverse_transform(F), R, rtol=1e-12)
        want = -0.5 * np.mean(np.sum((R - X) ** 2, axis=1))
        assert est.score(X) == pytest.approx(want, rel=1e-12)
        assert est.metrics_["kind"] == est.kind and est.metrics_["latents"] == 12
    # topk: at most k latents per row, among the k largest pre-activations
    F = topk.transform(X)
    assert np.count_nonzero(F, axis=1).max() <= 3 and topk.metrics_["l0"] <= 3
    Z = (X - topk.b2_) @ topk.W1_.T + topk.b1_
    top = np.zeros(Z.shape, dtype=bool)
    np.put_along_axis(top, np.argsort(Z, axis=1)[:, -3:], True, axis=1)
    assert not np.any((F > 0) & ~top)
    # relu-l1: every positive pre-activation is kept
    Z = (X - relu.b2_) @ relu.W1_.T + relu.b1_
    np.testing.assert_array_equal(relu.transform(X) > 0, Z > 0)


def test_one_seam_for_arrays_zarr_and_dask(two_workers, tmp_path):
    import dask.array as da

    X = np.random.default_rng(1).random((600, 16))
    path = tmp_path / "ds"
    write_dataset(path, X, 600, 16, dtype="float64", chunk_rows=100)
    params = {"hidden": 5, "max_iter": 8, "rho": 0.1, "beta": 0.5, "seed": 3}
    on_zarr = SparseAutoencoder(**params, client=two_workers).fit(str(path))
    on_dask = SparseAutoencoder(**params).fit(
        da.from_array(X, chunks=(100, 16)), client=two_workers
    )
    chunked = SparseAutoencoder(**params, chunk_rows=100).fit(X)
    in_memory = SparseAutoencoder(**params).fit(X)  # one chunk: its sums in another order
    for name in ("W1_", "b1_", "W2_", "b2_"):  # the same job: the same bits
        assert np.array_equal(getattr(on_zarr, name), getattr(on_dask, name)), name
        assert np.array_equal(getattr(on_zarr, name), getattr(chunked, name)), name
        np.testing.assert_allclose(getattr(in_memory, name), getattr(on_zarr, name), atol=1e-8)
    assert on_zarr.n_iter_ == in_memory.n_iter_ == 8
    assert on_zarr.metrics_["dataset"] == str(path) and on_dask.metrics_["dataset"] is None
    np.testing.assert_allclose(on_zarr.transform(X), in_memory.transform(X), atol=1e-8)


@pytest.mark.parametrize(
    "params",
    [
        dict(hidden=6, rho=0.1, beta=0.5, optimizer="adam", learning_rate=0.02, seed=3)
        | dict(batch_size=32, epochs=3, lr_schedule="cosine", warmup_steps=3)
        | dict(clip_grad_norm=5.0, validation_fraction=0.25, validate_every=4),
        dict(kind="topk", hidden=8, k=3, k_aux=2, optimizer="sgd", learning_rate=0.05)
        | dict(momentum=0.5, nesterov=True, batch_size=40, epochs=2, seed=1),
    ],
    ids=["adam-sigmoid-kl", "sgd-topk"],
)
def test_stochastic_fit_is_the_cli_job(two_workers, tmp_path, params):
    X = np.random.default_rng(4).random((300, 12))
    path = tmp_path / "ds"
    write_dataset(path, X, 300, 12, dtype="float64", chunk_rows=50)
    result = train(TrainSpec(dataset=str(path), **params), tmp_path / "cli", client=two_workers)
    assert result.status == "succeeded"
    net, theta, _ = load_model(result.model_path)
    (W1, W2), (b1, b2) = net.unpack(net.effective(theta))
    on_zarr = SparseAutoencoder(**params, client=two_workers).fit(str(path))
    in_memory = SparseAutoencoder(**params, chunk_rows=50).fit(X)  # the same chunks
    for est in (on_zarr, in_memory):
        for name, want in zip(("W1_", "b1_", "W2_", "b2_"), (W1, b1, W2, b2), strict=True):
            assert np.array_equal(getattr(est, name), want), name
        assert (est.n_iter_, est.loss_) == (result.iterations, result.final_cost)
        assert sorted(est.metrics_) == sorted(result.metrics)
        for key, value in result.metrics.items():
            if key not in ("dataset", "model"):
                np.testing.assert_equal(est.metrics_[key], value, err_msg=key)
    held = "validation_fraction" in params
    assert in_memory.metrics_["split"] == ("held-out" if held else "all")
    assert in_memory.metrics_["dataset"] is None
