"""The autoencoder objective written as sums that add across chunks of examples.

For ``m`` examples (rows of X) and targets Y (Y = X for an autoencoder), the notes' cost is

    J = (1/m) sum_i 1/2 ||h(x_i) - y_i||^2  +  lam/2 sum_l ||W_l||^2
        + sum_{sparse l} beta_l sum_j KL(rho_l || rho_hat_lj)

Every data-dependent quantity is a sum over examples, so it is computed chunk by chunk:

- :func:`pass1` - per chunk, the activation sums of every sparse layer and the count; after
  adding all chunks, :func:`rho_hat` divides by m.
- :func:`pass2` - per chunk and given rho_hat, the error sum and the backpropagation sums
  ``sum_i delta_l a_{l-1}^T`` and ``sum_i delta_l`` where ``delta_l`` carries
  ``beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))``.
- :func:`fused` - one pass: as pass 2 without the sparsity part of ``delta_1``, plus
  ``sum_i f'(z_1) x^T`` and ``sum_i f'(z_1)`` so that the sparsity part ``s * f'(z_1)`` is
  applied in :func:`finalize` once ``s`` is known.
- :func:`finalize` - divides by m, adds weight decay and the KL term.

A ``Sums`` is a flat ``dict[str, ndarray]`` of float64 arrays; :func:`add_sums` adds two.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from sae import dictionary
from sae.activations import get_activation
from sae.blas import blas_ready
from sae.blocks import accumulate, colsum, half_sqsum, matmul, row_blocks
from sae.network import Network

Sums = dict[str, np.ndarray]
Passes = Literal["two", "fused"]
#: Compute dtypes -> the dtype of the elementwise work ("bfloat16": matrix products in bfloat16
#: through PyTorch, the rest in float32; :func:`sae.blocks.matmul`).
DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": np.float32}


def array_dtype(dtype: str) -> str:
    """The dtype of the arrays a compute dtype works on: itself, or float32 for bfloat16
    (whose products round their float32 operands to bfloat16 on the fly)."""
    return "float32" if dtype == "bfloat16" else dtype


def _compute_dtype(dtype: str | type | None) -> type:
    if dtype is None:
        return np.float64
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"dtype: choose one of {sorted(DTYPES)}, got {dtype!r}") from None
    return np.dtype(dtype).type


def forward(
    net: Network, theta: np.ndarray, X: np.ndarray, upto: int | None = None, dtype=None
) -> list[np.ndarray]:
    """Activations of every layer.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,)
    X : ndarray of shape (m, n_0)
    upto : int, optional
        Last layer to compute (default ``L``).
    dtype : {"float64", "float32"}, optional
        Compute dtype.

    Returns
    -------
    A : list of ndarrays, ``A[l]`` of shape (m, n_l) for ``l = 0..upto`` (``A[0]`` is X).
    """
    dt = _compute_dtype(dtype)
    if net.kind != "sigmoid-kl":
        return dictionary.forward(net, theta, X, upto, dt)
    X = blas_ready(net.check_X(X), dt)
    Ws, bs = net.unpack(theta)
    upto = net.n_layers if upto is None else upto
    A = [X]
    for l in range(1, upto + 1):
        W = Ws[l - 1].astype(dt, copy=False)
        b = bs[l - 1].astype(dt, copy=False)
        z = A[-1] @ W.T
        z += b
        A.append(get_activation(net.activations[l - 1]).f(z))
    return A


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def pass1(
    net: Network, theta: np.ndarray, X: np.ndarray, dtype=None, keep: list | None = None
) -> Sums:
    """Pass 1 on one chunk: activation sums of the sparse layers.

    Parameters
    ----------
    keep : list, optional
        Filled with each row block's activations of layers 1 to the last sparse one (a
        list of arrays of shape (block, n_l) per block), which :func:`pass2` takes as
        ``given`` instead of computing them again (a sigmoid-KL network's only).

    Returns
    -------
    sums : dict
        ``"count"`` (shape ()), and ``"a{l}_sum"`` of shape (n_l,) for every sparse layer l.
    """
    if net.kind != "sigmoid-kl":
        return dictionary.pass1(net, theta, X, _compute_dtype(dtype), matmul(dtype))
    sums: Sums = {"count": _f64(np.asarray(X).shape[0])}
    if not net.sparse_layers:
        return sums
    dt = _compute_dtype(dtype)
    X = blas_ready(net.check_X(X), dt)
    Ws, bs = net.unpack(theta)
    upto = max(net.sparse_layers)
    Wd = [blas_ready(W, dt) for W in Ws[:upto]]
    bd = [b.astype(dt) for b in bs[:upto]]
    acts = [get_activation(a) for a in net.activations[:upto]]
    mm = matmul(dtype)
    total: Sums | None = None
    for rows in row_blocks(X.shape[0]):
        a = X[rows]
        part: Sums = {}
        block = []
        for l in range(1, upto + 1):
            z = mm(a, Wd[l - 1].T)
            z += bd[l - 1]
            a = acts[l - 1].f(z)
            block.append(a)
            if l in net.sparse_layers:
                part[f"a{l}_sum"] = colsum(a)
        if keep is not None:
            keep.append(block)
        total = accumulate(total, part)
    sums.update(total)
    return sums


def rho_hat(net: Network, sums: Sums) -> dict[int, np.ndarray]:
    """Average activation of each sparse layer's units, mapped onto [0, 1].

    Returns
    -------
    rho_hat : dict
        layer -> ndarray of shape (n_l,). For a dictionary, what its pass 2 needs instead
        (:func:`sae.dictionary.stats`).
    """
    if net.kind != "sigmoid-kl":
        return dictionary.stats(net, sums)
    m = float(sums["count"])
    if m <= 0:
        raise ValueError("X: the dataset holds no examples")
    out = {}
    for l in net.sparse_layers:
        act = get_activation(net.activations[l - 1])
        out[l] = act.unit_scale * (sums[f"a{l}_sum"] / m) + act.unit_shift
    return out


def sparsity_delta(net: Network, rho_hat_: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """``c_l * beta_l * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))`` per sparse layer.

    ``c_l`` is the slope of the map of layer l's activation onto [0, 1] (1 for sigmoid).
    A layer with ``beta_l = 0`` has no penalty: zeros, whatever rho_hat is (even 0 or 1).
    Returns layer -> ndarray of shape (n_l,).
    """
    out = {}
    for l, rh in rho_hat_.items():
        rho, beta = net.rho[l - 1], net.beta[l - 1]
        if beta == 0:
            out[l] = np.zeros(np.shape(rh))
            continue
        c = get_activation(net.activations[l - 1]).unit_scale
        with np.errstate(divide="ignore", invalid="ignore"):
            out[l] = c * beta * (-rho / rh + (1.0 - rho) / (1.0 - rh))
    return out


def _not_finite_reason(net: Network, theta: np.ndarray, rho_hat_: dict[int, np.ndarray]) -> str:
    """Why a cost or gradient is not finite, in words: bad input, or saturated sparse units."""
    if not np.all(np.isfinite(theta)):
        return "non-finite values in the data or parameters (theta has some)"
    if not all(np.all(np.isfinite(r)) for r in rho_hat_.values()):
        return "non-finite values in the data or parameters"
    bad = [l for l, r in rho_hat_.items() if net.beta[l - 1] != 0 and not np.all((r > 0) & (r < 1))]
    if bad:
        return f"average activation of layer(s) {bad} reached 0 or 1 (saturated units)"
    return "non-finite values in the data or parameters"


def _backprop(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray | None,
    s: dict[int, np.ndarray],
    dtype,
    fused_layer1: bool = False,
    given: list | None = None,
) -> Sums:
    """Error sum and gradient sums for one chunk, with sparsity terms ``s`` added to deltas,
    in row blocks of :data:`BLOCK_ROWS`.

    With ``fused_layer1``, also the one-pass sums of layer 1 (:func:`fused`): ``"a1_sum"``,
    ``"fpx1"`` and ``"fp1"``; ``fpx1`` and ``W1`` come from one matrix product. ``given``:
    the first layers' activations of each block, as :func:`pass1` keeps them (computed by the
    same products: the same bits as computing them here).
    """
    dt = _compute_dtype(dtype)
    X = blas_ready(net.check_X(X), dt)
    if Y is not None:
        Y = blas_ready(_check_Y(net, Y, X.shape[0]), dt)
    Ws, bs = net.unpack(theta)
    Wd = [blas_ready(W, dt) for W in Ws]
    bd = [b.astype(dt) for b in bs]
    sd = {l: v.astype(dt) for l, v in s.items()}
    acts = [get_activation(a) for a in net.activations]
    L = net.n_layers
    mm = matmul(dtype)
    total: Sums | None = None
    blocks = row_blocks(X.shape[0])
    if given is not None and len(given) != len(blocks):
        raise ValueError(f"given: {len(given)} blocks of activations for {len(blocks)} blocks")
    for k, rows in enumerate(blocks):
        A = [X[rows], *(given[k] if given is not None else ())]
        for l in range(len(A) - 1, L):
            z = mm(A[-1], Wd[l].T)
            z += bd[l]
            A.append(acts[l].f(z))
        diff = A[L] - (A[0] if Y is None else Y[rows])
        part: Sums = {"err": half_sqsum(diff)}
        delta = acts[L - 1].fprime(A[L])  # a new array: scale in place
        delta *= diff
        del diff
        if fused_layer1:  # [delta_1 | f'(z_1)] side by side: W1 and fpx1 in one product (a
            # sparse layer 1 is never the output, so layer 2 writes delta_1 into it)
            h = net.sizes[1]
            both = np.empty((A[0].shape[0], 2 * h), dt)
            fp = both[:, h:]
            fp[...] = acts[0].fprime(A[1])
        for l in range(L, 0, -1):
            part[f"b{l}"] = colsum(delta)
            if l == 1 and fused_layer1:
                prod = mm(both.T, A[0])
                part["W1"] = prod[:h]
                part["fpx1"] = prod[h:]
                part["fp1"] = colsum(fp)
                part["a1_sum"] = colsum(A[1])
            else:
                part[f"W{l}"] = mm(delta.T, A[l - 1])
            if l > 1:
                back = mm(delta, Wd[l - 1])
                if (l - 1) in sd:
                    back += sd[l - 1]
                if l == 2 and fused_layer1:  # delta_1 straight into its half of the buffer
                    delta = np.multiply(back, fp, out=both[:, :h])
                else:
                    back *= acts[l - 2].fprime(A[l - 1])
                    delta = back
        total = accumulate(total, part)
    total["count"] = _f64(X.shape[0])
    return total


def _check_Y(net: Network, Y: np.ndarray, m: int) -> np.ndarray:
    Y = np.asarray(Y)
    if Y.shape != (m, net.sizes[-1]):
        raise ValueError(f"Y: expected shape ({m}, {net.sizes[-1]}), got {Y.shape}")
    return Y


def pass2(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    rho_hat_: dict[int, np.ndarray],
    Y: np.ndarray | None = None,
    dtype=None,
    given: list | None = None,
) -> Sums:
    """Pass 2 on one chunk, given rho_hat: error sum and backpropagation sums.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,)
    X : ndarray of shape (m_chunk, n_0)
    rho_hat_ : dict
        layer -> ndarray of shape (n_l,), from :func:`rho_hat` over the whole dataset.
    Y : ndarray of shape (m_chunk, n_L), optional
        Targets; default X.
    dtype : {"float64", "float32"}, optional
    given : list, optional
        What :func:`pass1` kept of the same ``X`` at the same ``theta`` (``keep``): its
        products are not computed again (a sigmoid-KL network's only).

    Returns
    -------
    sums : dict
        ``"count"``, ``"err"`` = sum_i 1/2 ||a_L - y||^2, ``"W{l}"`` of shape (n_l, n_{l-1})
        and ``"b{l}"`` of shape (n_l,).
    """
    if net.kind != "sigmoid-kl":
        return dictionary.pass2(net, theta, X, rho_hat_, Y, _compute_dtype(dtype), matmul(dtype))
    if Y is None and net.sizes[-1] != net.sizes[0]:
        raise ValueError("Y: targets are required when the output size differs from the input")
    s = sparsity_delta(net, rho_hat_)
    if not all(np.all(np.isfinite(sl)) for sl in s.values()):
        why = _not_finite_reason(net, theta, rho_hat_)
        raise FloatingPointError(f"objective: sparsity gradient is not finite: {why}")
    return _backprop(net, theta, X, Y, s, dtype, given=given)


def check_fused(net: Network) -> None:
    """Raise unless the one-pass form is exact for this network (sparsity on layer 1 only;
    for a dictionary, no AuxK, whose dead latents pass 1 counts)."""
    if net.kind != "sigmoid-kl":
        if net.sparse_layers:
            raise ValueError(
                "passes: TopK with AuxK needs two passes (pass 1 counts the dead latents); "
                "use passes='two'"
            )
        return
    if any(l != 1 for l in net.sparse_layers):
        raise ValueError(
            "passes: the fused one-pass gradient supports a sparsity target on the first "
            "hidden layer only; use passes='two'"
        )


def fused(
    net: Network, theta: np.ndarray, X: np.ndarray, Y: np.ndarray | None = None, dtype=None
) -> Sums:
    """One pass on one chunk: pass-1 and pass-2 sums without knowing rho_hat.

    Returns
    -------
    sums : dict
        The keys of :func:`pass1` and :func:`pass2` (the latter without the sparsity part of
        ``delta_1``), plus ``"fpx1"`` = sum_i f'(z_1) x_i^T of shape (n_1, n_0) and
        ``"fp1"`` = sum_i f'(z_1) of shape (n_1,) when layer 1 is sparse.
    """
    check_fused(net)
    if net.kind != "sigmoid-kl":
        return dictionary.pass2(net, theta, X, None, Y, _compute_dtype(dtype), matmul(dtype))
    if Y is None and net.sizes[-1] != net.sizes[0]:
        raise ValueError("Y: targets are required when the output size differs from the input")
    return _backprop(net, theta, X, Y, {}, dtype, fused_layer1=1 in net.sparse_layers)


def batch_stats(net: Network, sums1: Sums, previous: dict | None, decay: float) -> dict:
    """What pass 2 of a minibatch uses, from the batch's pass-1 totals ``sums1``: each sparse
    layer's rho_hat of the batch, averaged with the ``previous`` running average when there
    is one (``decay * previous + (1 - decay) * batch``); for a dictionary, the counters of
    examples since each latent was last active (:func:`sae.dictionary.since_fired`)."""
    if net.kind != "sigmoid-kl":
        return dictionary.since_fired(net, sums1, previous)
    batch = rho_hat(net, sums1)
    if previous is None:
        return batch
    return {l: decay * previous[l] + (1.0 - decay) * r for l, r in batch.items()}


def add_sums(a: Sums, b: Sums) -> Sums:
    """Elementwise sum of two partial sums with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"add_sums: keys differ: {sorted(a)} vs {sorted(b)}")
    return {k: a[k] + b[k] for k in a}


def merge_sums(pass1_sums: Sums, pass2_sums: Sums) -> Sums:
    """Combine pass-1 and pass-2 totals into the input of :func:`finalize`."""
    out = dict(pass2_sums)
    out.update({k: v for k, v in pass1_sums.items() if k != "count"})
    return out


def kl(rho: float, rho_hat_: np.ndarray) -> np.ndarray:
    """``KL(rho || rho_hat)`` between Bernoulli means, elementwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return rho * np.log(rho / rho_hat_) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat_))


def finalize(net: Network, theta: np.ndarray, sums: Sums) -> tuple[float, np.ndarray]:
    """Cost and gradient from the dataset totals of :func:`pass1` + :func:`pass2` or of
    :func:`fused`.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,)
    sums : dict
        Totals over all examples (see :func:`merge_sums`).

    Returns
    -------
    J : float
    grad : ndarray of shape (n_params,)

    Raises
    ------
    FloatingPointError
        If the cost or gradient is not finite (saturated units, diverging optimisation or
        non-finite data); the message says which.
    """
    if net.kind != "sigmoid-kl":
        return dictionary.finalize(net, theta, sums)
    m = float(sums["count"])
    if m <= 0:
        raise ValueError("X: the dataset holds no examples")
    Ws, _ = net.unpack(theta)
    rh = rho_hat(net, sums)
    gW = [sums[f"W{l}"] / m + net.lam * Ws[l - 1] for l in range(1, net.n_layers + 1)]
    gb = [sums[f"b{l}"] / m for l in range(1, net.n_layers + 1)]
    if "fpx1" in sums:
        s1 = sparsity_delta(net, rh)[1]
        with np.errstate(invalid="ignore", over="ignore"):  # checked below
            gW[0] = gW[0] + s1[:, None] * sums["fpx1"] / m
            gb[0] = gb[0] + s1 * sums["fp1"] / m
    J = float(sums["err"]) / m
    J += 0.5 * net.lam * sum(float(np.vdot(W, W)) for W in Ws)
    for l, r in rh.items():
        if net.beta[l - 1] != 0:
            J += net.beta[l - 1] * float(np.sum(kl(net.rho[l - 1], r)))
    grad = net.pack(gW, gb)
    if not np.isfinite(J) or not np.all(np.isfinite(grad)):
        why = _not_finite_reason(net, theta, rh)
        raise FloatingPointError(f"objective: cost or gradient is not finite: {why}")
    return J, grad


def cost(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray | None = None,
    passes: Passes = "two",
    dtype=None,
) -> tuple[float, np.ndarray]:
    """The objective on one in-memory array: the composition of the chunk functions.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (n_params,)
    X : ndarray of shape (m, n_0)
    Y : ndarray of shape (m, n_L), optional
    passes : {"two", "fused"}
    dtype : {"float64", "float32"}, optional

    Returns
    -------
    J : float
    grad : ndarray of shape (n_params,)
    """
    if passes == "two":  # pass 2 takes up the first layers' activations where pass 1 left
        keep = [] if net.kind == "sigmoid-kl" and net.sparse_layers else None
        s1 = pass1(net, theta, X, dtype=dtype, keep=keep)
        s2 = pass2(net, theta, X, rho_hat(net, s1), Y=Y, dtype=dtype, given=keep or None)
        return finalize(net, theta, merge_sums(s1, s2))
    if passes == "fused":
        return finalize(net, theta, fused(net, theta, X, Y=Y, dtype=dtype))
    raise ValueError(f"passes: choose 'two' or 'fused', got {passes!r}")


def sparse_autoencoder_cost(
    theta: np.ndarray,
    X: np.ndarray,
    visible_size: int,
    hidden_size: int,
    lam: float,
    rho: float,
    beta: float,
) -> tuple[float, np.ndarray]:
    """The UFLDL ``sparseAutoencoderCost`` with sigmoid units, examples as rows.

    Parameters
    ----------
    theta : ndarray of shape (2 * hidden_size * visible_size + hidden_size + visible_size,)
        ``[W1 (h x n), W2 (n x h), b1 (h), b2 (n)]``, row-major.
    X : ndarray of shape (m, visible_size)
    visible_size, hidden_size : int
    lam : float
        Weight decay, >= 0.
    rho : float
        Sparsity target in (0, 1).
    beta : float
        Weight of the sparsity penalty, >= 0.

    Returns
    -------
    J : float
    grad : ndarray of the shape of theta
    """
    net = Network.autoencoder(visible_size, hidden_size, lam=lam, rho=rho, beta=beta)
    return cost(net, theta, X)
