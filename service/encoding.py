"""Encode rows with a finished job's model: the forward pass is sae's, this only loads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sae import deep as sae_deep
from sae.network import Network
from worker import layout


def load_model(path: str | os.PathLike) -> tuple[Network, np.ndarray]:
    """The network and parameters saved in a job's ``model.npz``."""
    net, theta, _ = layout.load_model(Path(path))
    return net, theta


def encode(
    model_path: str | os.PathLike, X: list[list[float]], max_values: int | None = None
) -> tuple[list[list[float]], list[list[float]]]:
    """Code-layer features and reconstructions of rows ``X``.

    Parameters
    ----------
    model_path : path of model.npz
    X : rows of n_visible values
    max_values : int, optional
        Refuse requests whose outputs (rows x (largest hidden layer + output units)) exceed it.

    Returns
    -------
    hidden : rows of the innermost code layer, shape (m, n_code)
    reconstruction : rows of the output layer, shape (m, n_visible)

    Raises
    ------
    ValueError
        If the rows do not have the model's input size, they ask for more than ``max_values``
        output values, they hold NaN or infinities, or the computation overflows (in any
        layer, even one whose units saturate to finite values).
    """
    net, theta = load_model(model_path)
    per_row = max(net.sizes[1:-1], default=0) + net.sizes[-1]
    if max_values is not None and len(X) * per_row > max_values:
        raise ValueError(
            f"X: {len(X)} rows x {per_row} values per row exceed the limit of {max_values}; "
            "send fewer rows per request"
        )
    n = net.sizes[0]
    short = next((i for i, row in enumerate(X) if len(row) != n), None)
    if short is not None:
        raise ValueError(f"X: the model takes rows of {n} values, row {short} has {len(X[short])}")
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != n:
        raise ValueError(f"X: the model takes rows of {n} values, got shape {list(A.shape)}")
    if not np.all(np.isfinite(A)):
        raise ValueError("X: values must be finite numbers (no NaN or infinity)")
    try:
        # an overflow anywhere (inputs times weights beyond the float range, say) is an error,
        # not the saturated units it would leave behind; sigmoid's own saturation is not one
        with np.errstate(over="raise", invalid="raise"):
            code = sae_deep.encode(net, theta, A)
            recon = sae_deep.reconstruct(net, theta, A)
    except FloatingPointError:
        code = recon = None
    if code is None or not (np.all(np.isfinite(code)) and np.all(np.isfinite(recon))):
        raise ValueError("X: values too large, the features overflow")
    return code.tolist(), recon.tolist()
