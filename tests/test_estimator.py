"""The scikit-learn estimator: scikit-learn's own checks, the formulas of its methods, and one
seam for in-memory arrays, Zarr datasets and Dask arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import check_estimator

from sae import objective as obj
from worker.dataset import write_dataset
from worker.estimator import SparseAutoencoder
from worker.schedule import build_network


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_scikit_learn_checks_pass():
    # rho=None and linear outputs: scikit-learn's checks feed data of any scale and sign (e.g.
    # centred at 100), on which sigmoid units with a sparsity target saturate by design
    check_estimator(SparseAutoencoder(hidden=3, max_iter=15, rho=None, output_activation="linear"))


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
    # in a pipeline, cloned
    pipe = make_pipeline(MinMaxScaler(), clone(est))
    assert pipe.fit_transform(X * 50 - 7).shape == (120, 4)
    with pytest.raises(ValueError, match="output_activation"):
        SparseAutoencoder(max_iter=2).fit(X * 3)  # sigmoid outputs cannot reach 3


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
    in_memory = SparseAutoencoder(**params).fit(X)
    for name in ("W1_", "b1_", "W2_", "b2_"):  # the same job: the same bits
        assert np.array_equal(getattr(on_zarr, name), getattr(on_dask, name)), name
        # in memory the sums are added in another order: the same model to rounding
        np.testing.assert_allclose(getattr(in_memory, name), getattr(on_zarr, name), atol=1e-8)
    assert on_zarr.n_iter_ == in_memory.n_iter_ == 8
    np.testing.assert_allclose(on_zarr.transform(X), in_memory.transform(X), atol=1e-8)
