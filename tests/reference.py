"""An independent reference: the notes' equations written as a loop over examples.

Nothing here calls ``sae``'s objective code. Derivatives are taken from z (not from the
activation), and the sparsity term is written per unit, so a mistake in the vectorised
implementation cannot be copied here.
"""

from __future__ import annotations

import math

import numpy as np


def f(name: str, z: float) -> float:
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-z))
    if name == "tanh":
        return math.tanh(z)
    return z


def fprime(name: str, z: float) -> float:
    if name == "sigmoid":
        e = math.exp(-z)
        return e / (1.0 + e) ** 2
    if name == "tanh":
        return 1.0 / math.cosh(z) ** 2
    return 1.0


# How each activation is mapped onto [0, 1] for rho_hat: u = c * a + d.
UNIT = {"sigmoid": (1.0, 0.0), "tanh": (0.5, 0.5)}


def loop_cost(sizes, acts, Ws, bs, X, Y, lam, rho, beta):
    """J and the gradient lists (dW, db) by a per-example, per-unit loop.

    ``rho`` and ``beta`` are per-layer lists (None where a layer has no sparsity target).
    """
    m = X.shape[0]
    L = len(sizes) - 1
    # forward pass, storing z and a of every layer for every example
    zs, as_ = [], []
    for i in range(m):
        a = [list(X[i])]
        z = [None]
        for l in range(1, L + 1):
            zl, al = [], []
            for j in range(sizes[l]):
                s = bs[l - 1][j]
                for k in range(sizes[l - 1]):
                    s += Ws[l - 1][j, k] * a[l - 1][k]
                zl.append(s)
                al.append(f(acts[l - 1], s))
            z.append(zl)
            a.append(al)
        zs.append(z)
        as_.append(a)
    # average activation rho_hat of sparse layers
    rho_hat = {}
    for l in range(1, L + 1):
        if rho[l - 1] is None:
            continue
        c, d = UNIT[acts[l - 1]]
        rho_hat[l] = [c * sum(as_[i][l][j] for i in range(m)) / m + d for j in range(sizes[l])]
    J = 0.0
    for i in range(m):
        J += 0.5 * sum((as_[i][L][j] - Y[i][j]) ** 2 for j in range(sizes[L])) / m
    J += 0.5 * lam * sum(float((W**2).sum()) for W in Ws)
    for l, rh in rho_hat.items():
        r = rho[l - 1]
        for q in rh:
            J += beta[l - 1] * (r * math.log(r / q) + (1 - r) * math.log((1 - r) / (1 - q)))
    dW = [np.zeros_like(W) for W in Ws]
    db = [np.zeros_like(b) for b in bs]
    for i in range(m):
        out = [(as_[i][L][j] - Y[i][j]) * fprime(acts[L - 1], zs[i][L][j]) for j in range(sizes[L])]
        delta = {L: out}
        for l in range(L - 1, 0, -1):
            dl = []
            for j in range(sizes[l]):
                back = sum(Ws[l][k, j] * delta[l + 1][k] for k in range(sizes[l + 1]))
                if l in rho_hat:
                    c, _ = UNIT[acts[l - 1]]
                    r, q = rho[l - 1], rho_hat[l][j]
                    back += c * beta[l - 1] * (-r / q + (1 - r) / (1 - q))
                dl.append(back * fprime(acts[l - 1], zs[i][l][j]))
            delta[l] = dl
        for l in range(1, L + 1):
            for j in range(sizes[l]):
                db[l - 1][j] += delta[l][j] / m
                for k in range(sizes[l - 1]):
                    dW[l - 1][j, k] += delta[l][j] * as_[i][l - 1][k] / m
    for l in range(L):
        dW[l] += lam * Ws[l]
    return J, dW, db
