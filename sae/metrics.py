"""How good a trained model is: reconstruction and sparsity metrics, as chunk sums.

For m examples ``x_i`` with n features, a model's reconstructions ``x_hat_i`` and its latents
``a_i`` (h of them: the hidden layer of a one-hidden-layer model, the code layer of a deep
one)::

    mse                = (1/m) sum_i ||x_i - x_hat_i||^2 / n        (per element)
    fvu                = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2
    explained_variance = 1 - fvu
    density_j          = (1/m) #{i : latent j active on x_i}        (shape (h,))
    l0                 = (1/m) sum_i #{j : latent j active on x_i} = sum_j density_j
    dead               = #{j : density_j = 0},   dead_fraction = dead / h
    cosine             = mean over i with ||x_i|| > 0 and ||x_hat_i|| > 0 of cos(x_i, x_hat_i)
    shrinkage          = mean over i with ||x_i|| > 0 of ||x_hat_i|| / ||x_i||

``mean(x)`` is the mean of the evaluated data, so ``fvu`` is the reconstruction error relative
to the data's total variance about its own mean (``1 - fvu`` is scikit-learn's
``r2_score(X, X_hat, multioutput="variance_weighted")``, not its ``explained_variance_score``,
which averages per-feature ratios of variances of the residual).

**Active** latents: for the dictionary kinds (``relu-l1``, ``topk``) a latent is active when
its value is > 0 (ReLU latents are exactly 0 otherwise). The classic ``sigmoid-kl`` units are
never exactly 0, so a unit is active when its activation mapped onto [0, 1] (the map of its
sparsity target, ``u = unit_scale * a + unit_shift``: ``a`` for sigmoid, ``(a + 1) / 2`` for
tanh) exceeds ``threshold`` (default 0.1); units without such a map (linear, relu) are active
when ``|a| > threshold``.

Every data-dependent figure is a sum over examples, so :func:`metric_sums` runs on one chunk,
:func:`sae.objective.add_sums` adds chunks (in any fixed-shape tree) and
:func:`finalize_metrics` divides. The total variance is computed from the sums of the
*shifted* data ``x - K`` (``K`` any one row of the data, the same for every chunk)::

    sum_i ||x_i - mean||^2 = sum_i ||x_i - K||^2 - ||sum_i (x_i - K)||^2 / m

exact algebra, and numerically stable when ``K`` is close to the data (a row of it is): the
unshifted form (``K = 0``) cancels catastrophically on data with a large offset (about 1e-5
relative error on 1000 + noise of standard deviation 0.01, against 1e-15 with ``K`` a row).
"""

from __future__ import annotations

import math

import numpy as np

from sae import objective as obj
from sae.activations import get_activation
from sae.network import Network

Sums = dict[str, np.ndarray]

#: The default activity threshold of the classic units (on their [0, 1] scale).
DEFAULT_THRESHOLD = 0.1
#: Bins per decade of the log10 firing-frequency histogram.
BINS_PER_DECADE = 8


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def latent_layer(net: Network) -> int:
    """The layer whose units are the latents: 1 for a one-hidden-layer model, the code layer
    (:func:`sae.deep.n_encoder_layers`) of a deep one."""
    from sae.deep import n_encoder_layers

    return 1 if net.n_layers <= 2 else n_encoder_layers(net)


def active_rule(net: Network, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The rule that makes a latent active, in words (recorded with the metrics)."""
    if net.kind != "sigmoid-kl":
        return "a > 0"
    act = get_activation(net.activations[latent_layer(net) - 1])
    if act.unit_scale is None:
        return f"|a| > {threshold:g}"
    if act.unit_scale == 1.0 and act.unit_shift == 0.0:
        return f"a > {threshold:g}"
    return f"{act.unit_scale:g} * a + {act.unit_shift:g} > {threshold:g}"


def active(net: Network, a: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Which latents are active (see the module docstring).

    Parameters
    ----------
    net : Network
    a : ndarray of shape (m, h)
        Latent activations (of :func:`latent_layer`).
    threshold : float
        For the classic units: the activity threshold on their [0, 1] scale.

    Returns
    -------
    mask : ndarray of shape (m, h), bool
    """
    if net.kind != "sigmoid-kl":
        return a > 0
    act = get_activation(net.activations[latent_layer(net) - 1])
    if act.unit_scale is None:
        return np.abs(a) > threshold
    return act.unit_scale * a + act.unit_shift > threshold


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float, or a ValueError naming it (a finite number >= 0)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"threshold: must be a number, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold: must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def check_model(net: Network) -> None:
    """Raise unless the model reconstructs its input (output size = input size)."""
    if net.sizes[-1] != net.sizes[0]:
        raise ValueError(
            f"model: its output has {net.sizes[-1]} units, not the {net.sizes[0]} inputs it "
            "would reconstruct (a pretraining stage of another layer?)"
        )


def metric_sums(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    dtype: str = "float64",
    *,
    shift: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Sums:
    """The metric sums of one chunk of examples.

    Parameters
    ----------
    net : Network
        Any model kind; one hidden layer, or a deep autoencoder (latents: its code layer).
    theta : ndarray of shape (net.n_params,)
    X : ndarray of shape (m_chunk, n)
    dtype : {"float64", "float32"}
        Compute dtype of the forward pass; the sums are float64.
    shift : ndarray of shape (n,), optional
        The shift ``K`` of the variance sums: give every chunk the same one, ideally a row of
        the data (default zeros: precise only for data near 0).
    threshold : float
        Activity threshold of the classic units (see :func:`active`).

    Returns
    -------
    sums : dict of float64 arrays
        ``"count"`` (); ``"err"`` = sum ||x - x_hat||^2 (); ``"dx"`` = sum (x - K) (n,);
        ``"dx2"`` = sum ||x - K||^2 (); ``"fired"`` = examples each latent is active on
        (h,); ``"cos"`` = sum of cos(x, x_hat) and ``"cos_n"`` its count (); ``"shrink"`` =
        sum of ||x_hat|| / ||x|| and ``"shrink_n"`` its count ().
    """
    check_model(net)
    threshold = check_threshold(threshold)
    k = latent_layer(net)
    X64 = _f64(X)
    if X64.ndim != 2 or X64.shape[1] != net.sizes[0]:
        raise ValueError(f"X: expected shape (m, {net.sizes[0]}), got {X64.shape}")
    A = obj.forward(net, theta, X64, dtype=dtype)
    x_hat = _f64(A[-1])
    a = A[k]
    K = np.zeros(X64.shape[1]) if shift is None else _f64(shift)
    if K.shape != (X64.shape[1],):
        raise ValueError(f"shift: expected shape ({X64.shape[1]},), got {K.shape}")
    d = X64 - x_hat
    D = X64 - K
    x_norm = np.sqrt(np.einsum("ij,ij->i", X64, X64))
    r_norm = np.sqrt(np.einsum("ij,ij->i", x_hat, x_hat))
    dot = np.einsum("ij,ij->i", X64, x_hat)
    both = (x_norm > 0) & (r_norm > 0)
    nonzero = x_norm > 0
    cos = dot[both] / (x_norm[both] * r_norm[both])
    return {
        "count": _f64(X64.shape[0]),
        "err": _f64(np.einsum("ij,ij->", d, d)),
        "dx": _f64(D.sum(axis=0)),
        "dx2": _f64(np.einsum("ij,ij->", D, D)),
        "fired": _f64(np.count_nonzero(active(net, a, threshold), axis=0)),
        "cos": _f64(cos.sum()),
        "cos_n": _f64(np.count_nonzero(both)),
        "shrink": _f64((r_norm[nonzero] / x_norm[nonzero]).sum()),
        "shrink_n": _f64(np.count_nonzero(nonzero)),
    }


def density_histogram(density: np.ndarray, examples: int | None = None) -> dict:
    """The histogram of log10 firing frequencies drawn in ``density.png``.

    Bins of ``1 / BINS_PER_DECADE`` decade from the decade below the rarest firing latent
    (or below ``1 / examples``, the rarest possible) up to 10^0; dead latents (density 0)
    are counted apart.

    Parameters
    ----------
    density : ndarray of shape (h,)
        Firing frequency of each latent, in [0, 1].
    examples : int, optional
        Examples evaluated (sets the left edge).

    Returns
    -------
    histogram : dict
        ``"log10_edges"`` (list of bins + 1 floats), ``"counts"`` (list of bins ints),
        ``"dead"`` (int).
    """
    density = _f64(density).ravel()
    alive = density[density > 0]
    lows = [np.log10(alive.min())] if alive.size else []
    if examples:
        lows.append(-math.log10(examples))
    lo = min(-1.0, math.floor(min(lows))) if lows else -1.0
    n_bins = int(round(-lo * BINS_PER_DECADE))
    edges = np.linspace(lo, 0.0, n_bins + 1)
    if alive.size:
        counts = np.histogram(np.log10(alive), bins=edges)[0]
    else:
        counts = np.zeros(n_bins, dtype=np.int64)
    return {
        "log10_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int(density.size - alive.size),
    }


def finalize_metrics(net: Network, sums: Sums, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The metrics from the dataset totals of :func:`metric_sums` (see the module docstring).

    Parameters
    ----------
    net : Network
    sums : dict
        Totals of :func:`metric_sums` over the evaluated chunks.
    threshold : float
        The threshold the sums were computed with (recorded).

    Returns
    -------
    metrics : dict
        ``examples``, ``features`` (n), ``latents`` (h), ``latent_layer``, ``kind``;
        ``mse``, ``fvu``, ``explained_variance`` (None when the data have no variance);
        ``l0``, ``dead``, ``dead_fraction``; ``cosine``, ``shrinkage`` (None when no example
        counts), ``zero_norm_examples`` (``||x|| = 0``: left out of both),
        ``zero_reconstructions`` (``||x_hat|| = 0``, ``||x|| > 0``: left out of cosine);
        ``active`` (the rule, in words), ``threshold`` (None for the dictionary kinds, whose
        rule has none); ``density_histogram`` (:func:`density_histogram`); and ``density``,
        an ndarray of shape (h,) (not JSON: keep it out of tables and files).

    Raises
    ------
    ValueError
        If the sums hold no examples.
    """
    threshold = check_threshold(threshold)
    m = float(sums["count"])
    if m <= 0:
        raise ValueError("X: the evaluated data hold no examples")
    n = net.sizes[0]
    err = float(sums["err"])
    dx = _f64(sums["dx"])
    ss = float(sums["dx2"]) - float(np.dot(dx, dx)) / m
    if ss > 0:
        fvu: float | None = err / ss
    else:  # constant data: no variance to explain
        fvu = None
    density = _f64(sums["fired"]) / m
    h = density.size
    dead = int(np.count_nonzero(sums["fired"] == 0))
    cos_n, shrink_n = float(sums["cos_n"]), float(sums["shrink_n"])
    return {
        "kind": net.kind,
        "examples": int(m),
        "features": n,
        "latents": h,
        "latent_layer": latent_layer(net),
        "mse": err / (m * n),
        "fvu": fvu,
        "explained_variance": None if fvu is None else 1.0 - fvu,
        "l0": float(sums["fired"].sum()) / m,
        "dead": dead,
        "dead_fraction": dead / h,
        "cosine": float(sums["cos"]) / cos_n if cos_n > 0 else None,
        "shrinkage": float(sums["shrink"]) / shrink_n if shrink_n > 0 else None,
        "zero_norm_examples": int(m - shrink_n),
        "zero_reconstructions": int(shrink_n - cos_n),
        "active": active_rule(net, threshold),
        "threshold": threshold if net.kind == "sigmoid-kl" else None,
        "density_histogram": density_histogram(density, int(m)),
        "density": density,
    }


def array_metrics(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    dtype: str = "float64",
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """:func:`finalize_metrics` of the whole array ``X`` of shape (m, n) in one call (the
    shift is its first row)."""
    X = _f64(X)
    shift = X[0] if X.ndim == 2 and X.shape[0] else None
    sums = metric_sums(net, theta, X, dtype, shift=shift, threshold=threshold)
    return finalize_metrics(net, sums, threshold)
