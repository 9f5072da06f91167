"""A scikit-learn estimator of the sparse autoencoders: ``fit``, ``transform``,
``inverse_transform``, ``score``, ``get_params``/``set_params``, in a pipeline like any other.

    from worker.estimator import SparseAutoencoder

    sae = SparseAutoencoder(hidden=196, rho=0.1, lam=3e-3, beta=3, max_iter=400)
    codes = sae.fit_transform(X)                    # ndarray (m, 784) -> (m, 196), in memory
    sae.fit("data/mnist")                           # a Zarr dataset: on the embedded cluster
    sae.fit(dask_array, client=client)              # a Dask array: on that cluster
    SparseAutoencoder(kind="topk", hidden=512, k=32, optimizer="adam").fit(X)

Every parameter but the few that say where to run is a field of :class:`worker.spec.TrainSpec`
of the same name, and a fit is the job that spec describes, with the stage
:class:`worker.schedule.Schedule` makes of it (its network, starting point, optimizer options,
minibatches, held-out chunks, budget). One seam picks where it runs (as dask-ml's
``Incremental`` does):

- a Zarr path, or a Dask array (written chunk by chunk to a temporary Zarr store first), is
  trained by :func:`worker.train.train` on a Dask cluster: the same job as ``sae train``, with
  the same bits;
- an in-memory array is stored in a temporary Zarr dataset too (float64, in chunks of
  ``chunk_rows``: they define the minibatches and the held-out split), and its stage runs in
  this process with the job's sums and reduction tree: full-batch optimizers through
  :func:`sae.optimize.minimize` over :func:`worker.chunks.evaluate_chunks` (what
  :class:`worker.engine.LocalObjective` computes), adam and sgd through the job loop's
  stochastic stage kind, :func:`worker.stochastic.run_stochastic_stage`, over the minibatch
  sums of :class:`worker.engine.BatchObjective`. So a fit on an array gives bitwise the model
  of ``sae train`` on that array written with the same chunks.

Either way the fitted model is ``W1_, b1_, W2_, b2_`` and its metrics ``metrics_``
(:func:`worker.evaluate.evaluate`, as the job writes them to ``metrics.json``).

Requires scikit-learn (``pip install "sae-service[sklearn]"``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from sae import objective as obj
from sae.network import Network
from worker.spec import TrainSpec

#: The parameters that are TrainSpec fields of the same name (a one-layer job's).
SPEC_FIELDS = (
    "kind",
    "hidden",
    "lam",
    "rho",
    "beta",
    "activation",
    "output_activation",
    "optimizer",
    "max_iter",
    "alpha",
    "passes",
    "dtype",
    "seed",
    "l1",
    "l1_weighting",
    "k",
    "k_aux",
    "aux_coeff",
    "dead_after",
    "unit_norm_decoder",
    "tied_init",
    "b_dec_init",
    "learning_rate",
    "batch_size",
    "epochs",
    "max_steps",
    "lr_schedule",
    "warmup_steps",
    "clip_grad_norm",
    "momentum",
    "nesterov",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "sparsity_estimate",
    "ema_decay",
    "shuffle_window",
    "validation_fraction",
    "validate_every",
    "early_stopping",
)
#: Parameters whose default depends on ``kind``: ``"auto"`` leaves them to the spec.
AUTO_FIELDS = ("lam", "rho", "beta", "activation")
#: The spec's ``dataset`` of an in-memory fit.
ARRAY_DATASET = "array"


class SparseAutoencoder(TransformerMixin, BaseEstimator):
    """A sparse autoencoder ``n -> hidden -> n`` as a scikit-learn transformer.

    Three model kinds (:mod:`sae.dictionary`): the CS294A autoencoder with a KL sparsity
    penalty (``"sigmoid-kl"``), and the ReLU dictionaries with a pre-encoder bias ``b_dec``
    and a linear decoder, sparse by an L1 penalty (``"relu-l1"``) or by keeping the ``k``
    largest latents of each example (``"topk"``). Parameters are checked when ``fit`` runs, as
    ``sae train`` checks its options; every error names its parameter.

    Parameters
    ----------
    hidden : int
        Hidden units (latents).
    lam : float or "auto"
        Weight decay (``"auto"``: 1e-4 for sigmoid-kl, none for relu-l1 and topk).
    rho : float or None or "auto"
        Sparsity target of sigmoid-kl (None: no sparsity penalty; ``"auto"``: 0.01 for
        sigmoid-kl, none for the other kinds, which refuse a target).
    beta : float or "auto"
        Weight of the KL penalty (``"auto"``: 3 for sigmoid-kl, none for the other kinds).
    activation : {"sigmoid", "tanh", "linear", "relu", "auto"}
        Hidden units (``"auto"``: sigmoid for sigmoid-kl, relu, the only choice, otherwise).
    output_activation : {"sigmoid", "tanh", "linear", "relu"}, optional
        Reconstruction units (default: as the hidden ones; linear, the only choice, for
        relu-l1 and topk).
    optimizer : {"lbfgs", "cg", "gd", "adam", "sgd"}
        Full-batch (every iteration reads all the data; ``max_iter`` iterations) or
        stochastic (every step reads one minibatch; ``epochs`` passes, at most ``max_steps``).
    max_iter : int
        Iterations of a full-batch optimizer.
    alpha : float
        Learning rate of ``gd``.
    passes : {"two", "fused"}
        Chunk passes of the objective.
    dtype : {"float64", "float32", "bfloat16"}
        Compute dtype (bfloat16: matrix products through PyTorch, the rest in float32).
    seed : int
        Seed of the initial weights (and of the minibatches' shuffle).
    client : distributed.Client, optional
        Cluster for Zarr and Dask inputs (default: an embedded LocalCluster per fit).
    workers : int
        Workers of that embedded cluster.
    out_dir : str, optional
        Job folder of a cluster fit (default: a temporary one): history, checkpoints, filters,
        metrics.
    kind : {"sigmoid-kl", "relu-l1", "topk"}
        Model kind.
    l1 : float, optional
        relu-l1: weight of the L1 penalty on the latents (default 1e-3).
    l1_weighting : {"none", "decoder-norm"}, optional
        relu-l1: weight each latent's L1 term by its decoder column's norm (default none).
    k : int, optional
        topk: active latents per example (required, at most ``hidden``).
    k_aux : int, optional
        topk: dead latents that reconstruct the residual (AuxK; default none).
    aux_coeff : float, optional
        topk: weight of the AuxK term (default 1/32).
    dead_after : int, optional
        topk with adam or sgd: a latent inactive for this many examples is dead (default:
        one epoch's rows); full-batch: dead means inactive on all the data.
    unit_norm_decoder : bool, optional
        relu-l1, topk: decoder columns of unit norm (default true).
    tied_init : bool, optional
        relu-l1, topk: start with ``W_enc = W_dec^T`` (default true).
    b_dec_init : {"mean", "zeros"}, optional
        relu-l1, topk: start ``b_dec`` at the training data's mean (default) or at zeros.
    learning_rate : float, optional
        Learning rate of adam (default 1e-3) and sgd (default 1e-2).
    batch_size : int
        Rows per minibatch (at most the training rows).
    epochs : int
        Passes over the training rows of adam and sgd.
    max_steps : int, optional
        At most this many steps of adam and sgd.
    lr_schedule : {"constant", "cosine", "linear"}
        After the warmup: a constant learning rate, or one decaying to 0 at the last step.
    warmup_steps : int
        Steps of linear warmup of the learning rate.
    clip_grad_norm : float, optional
        Scale a minibatch gradient longer than this to this norm.
    momentum : float
        Momentum of sgd.
    nesterov : bool
        Nesterov momentum for sgd.
    adam_beta1, adam_beta2, adam_eps : float
        Adam's moment decays and epsilon.
    sparsity_estimate : {"batch", "ema"}
        sigmoid-kl with adam or sgd: ``rho_hat`` of each minibatch, or a running average.
    ema_decay : float
        Decay of that running average.
    shuffle_window : int
        Chunks whose rows are shuffled together.
    validation_fraction : float, optional
        adam, sgd: hold out this share of the chunks (never trained on); the held-out cost is
        measured every ``validate_every`` steps and ``metrics_`` are of the held-out rows.
    validate_every : int
        Steps between held-out costs (and at every epoch's end).
    early_stopping : int, optional
        Stop after this many held-out costs without a new best (needs
        ``validation_fraction``).
    chunk_rows : int, optional
        Rows per chunk of the temporary dataset an array is stored in (default: a Dask
        array's own chunks; for an in-memory array about 16 MB per chunk, as
        :func:`worker.dataset.write_dataset` stores float64 data). The chunks are the units of
        the shuffle windows and of the held-out split.

    Attributes
    ----------
    W1_ : ndarray of shape (hidden, n_features_in_)
        Encoder weights (``W_enc`` of relu-l1 and topk).
    b1_ : ndarray of shape (hidden,)
        Encoder bias (``b_enc``).
    W2_ : ndarray of shape (n_features_in_, hidden)
        Decoder weights as the model computes with them (``W_dec``: unit columns with
        ``unit_norm_decoder``).
    b2_ : ndarray of shape (n_features_in_,)
        Decoder bias (``b_dec``, also subtracted from the inputs by relu-l1 and topk).
    n_features_in_ : int
    n_iter_ : int
        Iterations (steps, for adam and sgd) run.
    loss_ : float
        The objective at the fitted parameters; for adam and sgd, the last minibatch's.
    metrics_ : dict or None
        The fitted model's metrics on the training data (the held-out rows with
        ``validation_fraction``), as the job's ``metrics.json`` holds them (``mse``, ``fvu``,
        ``explained_variance``, ``l0``, ``dead``, ``density_histogram`` ...,
        :func:`worker.evaluate.evaluate`; ``dataset`` is None for arrays); None when they
        could not be measured.
    """

    def __init__(
        self,
        hidden: int = 25,
        lam: float | str = "auto",
        rho: float | str | None = "auto",
        beta: float | str = "auto",
        activation: str = "auto",
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
        *,
        kind: str = "sigmoid-kl",
        l1: float | None = None,
        l1_weighting: str | None = None,
        k: int | None = None,
        k_aux: int | None = None,
        aux_coeff: float | None = None,
        dead_after: int | None = None,
        unit_norm_decoder: bool | None = None,
        tied_init: bool | None = None,
        b_dec_init: str | None = None,
        learning_rate: float | None = None,
        batch_size: int = 256,
        epochs: int = 10,
        max_steps: int | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        clip_grad_norm: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_eps: float = 1e-8,
        sparsity_estimate: str = "batch",
        ema_decay: float = 0.99,
        shuffle_window: int = 4,
        validation_fraction: float | None = None,
        validate_every: int = 100,
        early_stopping: int | None = None,
        chunk_rows: int | None = None,
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
        self.kind = kind
        self.l1 = l1
        self.l1_weighting = l1_weighting
        self.k = k
        self.k_aux = k_aux
        self.aux_coeff = aux_coeff
        self.dead_after = dead_after
        self.unit_norm_decoder = unit_norm_decoder
        self.tied_init = tied_init
        self.b_dec_init = b_dec_init
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_steps = max_steps
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.clip_grad_norm = clip_grad_norm
        self.momentum = momentum
        self.nesterov = nesterov
        self.adam_beta1 = adam_beta1
        self.adam_beta2 = adam_beta2
        self.adam_eps = adam_eps
        self.sparsity_estimate = sparsity_estimate
        self.ema_decay = ema_decay
        self.shuffle_window = shuffle_window
        self.validation_fraction = validation_fraction
        self.validate_every = validate_every
        self.early_stopping = early_stopping
        self.chunk_rows = chunk_rows

    # ------------------------------------------------------------------ helpers
    def _spec(self, dataset: str) -> TrainSpec:
        """The job this estimator describes (validated as a REST spec is).

        Raises
        ------
        ValueError
            Naming the parameter (e.g. ``k`` with kind relu-l1, ``rho`` with kind topk).
        """
        from pydantic import ValidationError

        fields = {name: _plain(getattr(self, name)) for name in SPEC_FIELDS}
        for name in AUTO_FIELDS:
            if isinstance(fields[name], str) and fields[name] == "auto":
                del fields[name]
        try:
            return TrainSpec(dataset=dataset, **fields)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    def _chunk_rows(self, default: int) -> int:
        """Rows per chunk of a temporary dataset (``chunk_rows``, else ``default``)."""
        rows = _plain(self.chunk_rows)
        if rows is None:
            return int(default)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"chunk_rows: must be an integer >= 1, got {self.chunk_rows!r}")
        return rows

    def _set_model(
        self, net: Network, theta: np.ndarray, n_iter: int, loss: float, metrics: dict | None
    ) -> None:
        """The fitted attributes from the final ``theta`` of ``net`` (its effective decoder)."""
        (W1, W2), (b1, b2) = net.unpack(net.effective(np.asarray(theta, dtype=np.float64)))
        self.W1_, self.b1_, self.W2_, self.b2_ = W1.copy(), b1.copy(), W2.copy(), b2.copy()
        self.n_iter_ = max(1, int(n_iter))
        self.loss_ = float(loss)
        self.metrics_ = metrics
        self._fitted_network = net

    def _theta(self) -> np.ndarray:
        """theta of shape (n_params,) from the fitted attributes."""
        return self._fitted_network.pack([self.W1_, self.W2_], [self.b1_, self.b2_])

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, client: Any = None) -> SparseAutoencoder:
        """Train on ``X``.

        Parameters
        ----------
        X : array_like of shape (m, n), str or PathLike, or dask.array.Array of shape (m, n)
            An in-memory array (trained in this process), a Zarr dataset path or a Dask
            array (both trained on a Dask cluster).
        y : None
            Ignored.
        client : distributed.Client, optional
            The cluster of a Zarr or Dask fit (default: the ``client`` parameter).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Naming the parameter when the parameters do not describe a job (a bad
            combination such as ``k`` with kind relu-l1) or do not fit the data (e.g. a
            ``batch_size`` larger than the training rows).
        """
        if isinstance(X, str | os.PathLike):
            return self._fit_dataset(str(X), client)
        if _is_dask_array(X):
            return self._fit_dask(X, client)
        return self._fit_in_memory(X)

    def _fit_in_memory(self, X) -> SparseAutoencoder:
        from worker.dataset import default_chunk_rows, write_dataset
        from worker.schedule import Schedule, check_job, check_output_range
        from worker.stage_id import StageId

        spec = self._spec(ARRAY_DATASET)
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=1, order="C")
        m, n = X.shape
        check_output_range(spec, (float(X.min()), float(X.max())))
        rows = self._chunk_rows(default_chunk_rows(n, "float64"))
        with tempfile.TemporaryDirectory(prefix="sae-fit-") as tmp:
            path = str(Path(tmp) / "X")
            write_dataset(path, X, m, n, dtype="float64", chunk_rows=rows, source="array")
            info = check_job(spec, path)
            schedule = Schedule(spec, info, Path(tmp) / "job")
            stage = schedule.stage(StageId.single(), [])
            # nothing resumes from this folder: no pictures, and of the checkpoints only those
            # the loop writes anyway (epoch ends, validations, the end); the same trajectory
            stage = dataclasses.replace(
                stage, pictures=False, checkpoint_every=max(1, stage.max_iter)
            )
            chunks = [X[info.chunk_slice(i)] for i in range(info.n_chunks)]
            if stage.batches is None:
                theta, loss, n_iter = _run_full_batch(stage, chunks)
            else:
                theta, loss, n_iter = _run_stochastic(stage, chunks)
            metrics = _measure(stage.network, theta, path, schedule.held_out(), spec.dtype)
        self._set_model(stage.network, theta, n_iter, loss, metrics)
        return self

    def _fit_dataset(self, path: str, client: Any, array: bool = False) -> SparseAutoencoder:
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
        metrics = result.metrics
        if metrics is not None and array:
            metrics = {**metrics, "dataset": None}
        self.n_features_in_ = net.sizes[0]
        self._set_model(net, theta, result.iterations, result.final_cost, metrics)
        return self

    def _fit_dask(self, X, client: Any) -> SparseAutoencoder:
        from worker.dataset import write_dataset

        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-D Dask array (m, n), got shape {X.shape}")
        self._spec(ARRAY_DATASET)  # a bad parameter fails before the array is computed
        with tempfile.TemporaryDirectory(prefix="sae-dask-") as tmp:
            path = Path(tmp) / "X"
            rows = self._chunk_rows(int(X.chunks[0][0]))
            blocks = (np.asarray(b.compute(), dtype=np.float64) for b in X.to_delayed()[:, 0])
            dtype = "float64" if self.dtype == "float64" else "float32"
            write_dataset(
                path,
                blocks,
                int(X.shape[0]),
                int(X.shape[1]),
                dtype=dtype,
                chunk_rows=rows,
                source="dask array",
            )
            return self._fit_dataset(str(path), client, array=True)

    # ------------------------------------------------------------------ use
    def transform(self, X) -> np.ndarray:
        """The latents: ``a2 = f(W1 x + b1)`` (sigmoid-kl), ``ReLU((x - b2) W1^T + b1)``
        (relu-l1), the same kept on the ``k`` largest pre-activations of each row, zero
        elsewhere (topk).

        Parameters
        ----------
        X : array_like of shape (m, n_features_in_)

        Returns
        -------
        H : ndarray of shape (m, hidden)
        """
        check_is_fitted(self, "W1_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return obj.forward(self._fitted_network, self._theta(), X, upto=1)[1]

    def inverse_transform(self, X) -> np.ndarray:
        """Reconstructions from latents: ``f_out(W2 h + b2)`` (linear ``f_out`` for relu-l1
        and topk).

        Parameters
        ----------
        X : array_like of shape (m, hidden)

        Returns
        -------
        X_hat : ndarray of shape (m, n_features_in_)
        """
        check_is_fitted(self, "W1_")
        from sklearn.utils import check_array

        from sae.activations import get_activation

        H = check_array(X, dtype=np.float64)
        if H.shape[1] != self.W2_.shape[1]:
            raise ValueError(f"X: expected {self.W2_.shape[1]} hidden features, got {H.shape[1]}")
        act = get_activation(self._fitted_network.activations[-1])
        return act.f(H @ self.W2_.T + self.b2_)

    def score(self, X, y=None) -> float:
        """Minus the mean squared reconstruction error per example, ``-mean 1/2 ||x_hat -
        x||^2`` with ``x_hat = inverse_transform(transform(x))`` (higher is better, as
        scikit-learn expects), for every kind: the reconstruction term of the cost, without
        its penalties (weight decay, KL for sigmoid-kl, L1 for relu-l1, AuxK for topk)."""
        check_is_fitted(self, "W1_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        recon = self.inverse_transform(self.transform(X))
        return -0.5 * float(np.mean(np.sum((recon - X) ** 2, axis=1)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags


# ----------------------------------------------------------------------------- in memory


def _run_full_batch(stage, chunks: list[np.ndarray]) -> tuple[np.ndarray, float, int]:
    """Minimise a full-batch stage over in-memory ``chunks`` as :func:`worker.stage.run_stage`
    does (one BLAS thread), with :class:`worker.engine.LocalObjective`'s sums and tree.

    Returns
    -------
    (theta, J, iterations)
    """
    from sae.optimize import OptimizerState, minimize
    from worker.chunks import evaluate_chunks
    from worker.threads import one_blas_thread

    pairs = [(c, None) for c in chunks]
    m = sum(c.shape[0] for c in chunks)

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        theta = np.asarray(theta, dtype=np.float64)
        net, passes, dtype = stage.network, stage.passes, stage.dtype
        return evaluate_chunks(
            net, theta, lambda: iter(pairs), passes, dtype, m, n_chunks=len(pairs)
        )

    state = OptimizerState.start(stage.optimizer, stage.theta0, dict(stage.options))
    with one_blas_thread():
        final = minimize(f, state, stage.max_iter)
    if final.status == "diverged":
        raise FloatingPointError(f"optimizer: diverged: {final.message}")
    return np.asarray(final.theta, dtype=np.float64), float(final.J), int(final.iteration)


def _run_stochastic(stage, chunks: list[np.ndarray]) -> tuple[np.ndarray, float, int]:
    """Run a stochastic stage in this process with the job loop's stochastic stage kind
    (:func:`worker.stochastic.run_stochastic_stage`: steps, schedule, validation, early
    stopping, AuxK counters) over in-memory ``chunks``.

    Returns
    -------
    (theta, J of the last minibatch, steps)
    """
    from worker.stage import Hooks
    from worker.stochastic import run_stochastic_stage

    f = _batch_objective(stage.network, chunks, stage.passes, stage.dtype)
    validate = None
    if stage.validation is not None:
        held_out = stage.validation

        def validate(theta: np.ndarray) -> float:
            return f(theta, held_out)[0]

    result = run_stochastic_stage(
        stage, f, Hooks(), refresh_seconds=math.inf, write_cost=False, validate=validate
    )
    return result.theta, float(result.cost), result.iterations


def _batch_objective(net: Network, chunks: list[np.ndarray], passes: str, dtype: str):
    """``f(theta, parts, rho_ema, decay, slots) -> (J, grad, rho_hat)`` of one minibatch of
    in-memory ``chunks``: the part sums and fixed-shape tree of
    :class:`worker.engine.BatchObjective`, in this process (the same bits under one BLAS
    thread, which :func:`worker.stochastic.run_stochastic_stage` sets)."""
    from sae.blas import blas_ready
    from worker.tree import sequential_tree_sum

    def f(theta, parts, rho_ema: dict | None = None, decay: float = 0.99, slots=None):
        theta = np.asarray(theta, dtype=np.float64)
        Xs = [chunks[i][rows] for i, rows in parts]
        if passes == "fused":  # the batch's own rho_hat, inside its finalize
            total = sequential_tree_sum([obj.fused(net, theta, X, dtype=dtype) for X in Xs])
            J, grad = obj.finalize(net, theta, total)
            return float(J), blas_ready(grad, np.float64), None
        if net.sparse_layers:
            s1 = sequential_tree_sum([obj.pass1(net, theta, X, dtype=dtype) for X in Xs])
        else:
            s1 = {"count": np.float64(sum(len(r) for _, r in parts))}
        rho = obj.batch_stats(net, s1, rho_ema, decay)
        s2 = sequential_tree_sum([obj.pass2(net, theta, X, rho, dtype=dtype) for X in Xs])
        J, grad = obj.finalize(net, theta, obj.merge_sums(s1, s2))
        return float(J), blas_ready(grad, np.float64), rho

    return f


def _measure(
    net: Network, theta: np.ndarray, path: str, held_out: tuple[int, ...], dtype: str
) -> dict | None:
    """The metrics of an in-memory fit, as the job measures them (:func:`worker.evaluate.
    evaluate_job`: on the held-out chunks if any); a failure to measure is a warning."""
    from worker.evaluate import evaluate

    chunks = list(held_out) if held_out else None
    try:
        metrics = evaluate(net, theta, path, chunks=chunks, dtype=dtype, job="estimator")
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        warnings.warn(f"metrics: not measured ({exc})", RuntimeWarning, stacklevel=3)
        return None
    metrics.update(split="held-out" if held_out else "all", model=None, dataset=None)
    return {k: v for k, v in metrics.items() if k != "density"}  # as the job's, JSON-able


# ----------------------------------------------------------------------------- helpers


def _plain(value):
    """A numpy scalar as the Python scalar the spec's fields take (e.g. from a grid search)."""
    return value.item() if isinstance(value, np.generic) else value


def _describe(exc) -> str:
    """A pydantic ValidationError of the spec as ``"field: message; ..."``."""
    out: list[str] = []
    for err in exc.errors():
        msg = str(err.get("msg", ""))
        msg = msg.removeprefix("Value error, ")
        loc = err.get("loc") or ()
        name = str(loc[0]) if loc else ""
        if name and not msg.startswith(f"{name}: "):
            msg = f"{name}: {msg}"
        if msg not in out:
            out.append(msg)
    return "; ".join(out)


def _is_dask_array(X) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a dependency
        return False
    return isinstance(X, da.Array)
