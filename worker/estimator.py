"""A scikit-learn estimator of the sparse autoencoder: ``fit``, ``transform``,
``inverse_transform``, ``score``, ``get_params``/``set_params``, in a pipeline like any other.

    from worker.estimator import SparseAutoencoder

    sae = SparseAutoencoder(hidden=196, rho=0.1, lam=3e-3, beta=3, max_iter=400)
    codes = sae.fit_transform(X)                    # ndarray (m, 784) -> (m, 196), in memory
    sae.fit("data/mnist")                           # a Zarr dataset: on the embedded cluster
    sae.fit(dask_array, client=client)              # a Dask array: on that cluster

One seam picks the path (as dask-ml's ``Incremental`` does): an in-memory array is trained in
this process with the same objective and optimizers (:func:`sae.objective.cost`,
:func:`sae.optimize.minimize`); a Zarr path, or a Dask array (written chunk by chunk to a
temporary Zarr store first), is trained by :func:`worker.train.train` on a Dask cluster, the
same job as ``sae train``. Either way the fitted model is ``W1_, b1_, W2_, b2_``.

Requires scikit-learn (``pip install "sae-service[sklearn]"``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from sae import objective as obj
from sae.activations import get_activation
from sae.network import Network
from worker.spec import TrainSpec


class SparseAutoencoder(TransformerMixin, BaseEstimator):
    """The CS294A sparse autoencoder ``n -> hidden -> n`` as a scikit-learn transformer.

    Parameters
    ----------
    hidden : int
        Hidden units.
    lam, rho, beta : float
        Weight decay, sparsity target (None: no sparsity penalty) and its weight.
    activation, output_activation : {"sigmoid", "tanh", "linear"}
        Hidden and output units (output default: as the hidden ones).
    optimizer : {"lbfgs", "cg", "gd"}
    max_iter : int
    alpha : float
        Learning rate of ``gd``.
    passes : {"two", "fused"}
        Chunk passes of the distributed objective.
    dtype : {"float64", "float32"}
        Compute dtype.
    seed : int
        Seed of the initial weights.
    client : distributed.Client, optional
        Cluster for Zarr and Dask inputs (default: an embedded LocalCluster per fit).
    workers : int
        Workers of that embedded cluster.
    out_dir : str, optional
        Job folder of a cluster fit (default: a temporary one): history, checkpoints, filters.

    Attributes
    ----------
    W1_ : ndarray of shape (hidden, n_features_in_)
    b1_ : ndarray of shape (hidden,)
    W2_ : ndarray of shape (n_features_in_, hidden)
    b2_ : ndarray of shape (n_features_in_,)
    n_features_in_ : int
    n_iter_ : int
        Optimizer iterations run.
    loss_ : float
        The objective at the fitted parameters.
    """

    def __init__(
        self,
        hidden: int = 25,
        lam: float = 1e-4,
        rho: float | None = 0.01,
        beta: float = 3.0,
        activation: str = "sigmoid",
        output_activation: str | None = None,
        optimizer: str = "lbfgs",
        max_iter: int = 400,
        alpha: float = 0.1,
        passes: str = "two",
        dtype: str = "float64",
        seed: int = 0,
        client: Any = None,
        workers: int = 2,
        out_dir: str | None = None,
    ) -> None:
        self.hidden = hidden
        self.lam = lam
        self.rho = rho
        self.beta = beta
        self.activation = activation
        self.output_activation = output_activation
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.alpha = alpha
        self.passes = passes
        self.dtype = dtype
        self.seed = seed
        self.client = client
        self.workers = workers
        self.out_dir = out_dir

    # ------------------------------------------------------------------ helpers
    def _spec(self, dataset: str) -> TrainSpec:
        """The job this estimator describes (validated as a REST spec is)."""
        return TrainSpec(
            dataset=dataset,
            hidden=int(self.hidden),
            lam=self.lam,
            rho=self.rho,
            beta=self.beta,
            activation=self.activation,
            output_activation=self.output_activation,
            optimizer=self.optimizer,
            max_iter=self.max_iter,
            alpha=self.alpha,
            passes=self.passes,
            dtype=self.dtype,
            seed=self.seed,
        )

    def _network(self, n_features: int) -> Network:
        from worker.schedule import build_network

        return build_network(self._spec("in-memory"), n_features)

    def _set_model(self, net: Network, theta: np.ndarray, n_iter: int, loss: float) -> None:
        (W1, W2), (b1, b2) = net.unpack(np.array(theta, dtype=np.float64))
        self.W1_, self.b1_, self.W2_, self.b2_ = W1.copy(), b1.copy(), W2.copy(), b2.copy()
        self.n_iter_ = int(n_iter)
        self.loss_ = float(loss)

    def _theta(self) -> np.ndarray:
        net = self._network(self.n_features_in_)
        return net.pack([self.W1_, self.W2_], [self.b1_, self.b2_])

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, client: Any = None) -> SparseAutoencoder:
        """Train on ``X``: an array of shape (m, n) in memory, a Zarr dataset path, or a Dask
        array (both of the latter on a Dask cluster).

        Returns
        -------
        self
        """
        if isinstance(X, str | os.PathLike):
            return self._fit_dataset(str(X), client)
        if _is_dask_array(X):
            return self._fit_dask(X, client)
        return self._fit_in_memory(X)

    def _fit_in_memory(self, X) -> SparseAutoencoder:
        from sae.optimize import OptimizerState, minimize
        from worker.schedule import check_output_range, optimizer_options

        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=1)
        net = self._network(X.shape[1])
        spec = self._spec("in-memory")
        check_output_range(spec, (float(X.min()), float(X.max())))
        state = OptimizerState.start(
            spec.optimizer, net.init_theta(spec.seed), optimizer_options(spec)
        )

        def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
            return obj.cost(net, theta, X, passes=spec.passes, dtype=spec.dtype)

        final = minimize(f, state, max_iter=spec.max_iter)
        if final.status == "diverged":
            raise FloatingPointError(f"optimizer: diverged: {final.message}")
        self._set_model(net, final.theta, max(1, final.iteration), final.J)
        return self

    def _fit_dataset(self, path: str, client: Any) -> SparseAutoencoder:
        from worker.layout import load_model
        from worker.train import train

        spec = self._spec(path)
        client = client if client is not None else self.client
        with tempfile.TemporaryDirectory(prefix="sae-fit-") as tmp:
            out = Path(self.out_dir) if self.out_dir else Path(tmp) / "job"
            options = {"workers": self.workers}
            result = train(spec, out, client=client, cluster_options=options)
            if result.status != "succeeded":
                raise RuntimeError(f"training {result.status}: {result.message}")
            net, theta, _ = load_model(result.model_path)
        self.n_features_in_ = net.sizes[0]
        self._set_model(net, theta, max(1, result.iterations), result.final_cost)
        return self

    def _fit_dask(self, X, client: Any) -> SparseAutoencoder:
        from worker.dataset import write_dataset

        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-D Dask array (m, n), got shape {X.shape}")
        with tempfile.TemporaryDirectory(prefix="sae-dask-") as tmp:
            path = Path(tmp) / "X"
            rows = int(X.chunks[0][0])
            blocks = (np.asarray(b.compute(), dtype=np.float64) for b in X.to_delayed()[:, 0])
            dtype = "float32" if self.dtype == "float32" else "float64"
            write_dataset(
                path,
                blocks,
                int(X.shape[0]),
                int(X.shape[1]),
                dtype=dtype,
                chunk_rows=rows,
                source="dask array",
            )
            return self._fit_dataset(str(path), client)

    # ------------------------------------------------------------------ use
    def transform(self, X) -> np.ndarray:
        """Hidden activations ``a2 = f(W1 x + b1)``.

        Parameters
        ----------
        X : array_like of shape (m, n_features_in_)

        Returns
        -------
        H : ndarray of shape (m, hidden)
        """
        check_is_fitted(self, "W1_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return obj.forward(self._network(self.n_features_in_), self._theta(), X, upto=1)[1]

    def inverse_transform(self, X) -> np.ndarray:
        """Reconstructions from hidden activations: ``f_out(W2 h + b2)``.

        Parameters
        ----------
        X : array_like of shape (m, hidden)

        Returns
        -------
        X_hat : ndarray of shape (m, n_features_in_)
        """
        check_is_fitted(self, "W1_")
        from sklearn.utils import check_array

        H = check_array(X, dtype=np.float64)
        if H.shape[1] != self.W2_.shape[1]:
            raise ValueError(f"X: expected {self.W2_.shape[1]} hidden features, got {H.shape[1]}")
        act = get_activation(self.output_activation or self.activation)
        return act.f(H @ self.W2_.T + self.b2_)

    def score(self, X, y=None) -> float:
        """Minus the mean squared reconstruction error per example, ``-mean 1/2 ||x_hat - x||^2``
        (higher is better, as scikit-learn expects)."""
        check_is_fitted(self, "W1_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        recon = self.inverse_transform(self.transform(X))
        return -0.5 * float(np.mean(np.sum((recon - X) ** 2, axis=1)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags


def _is_dask_array(X) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a dependency
        return False
    return isinstance(X, da.Array)
