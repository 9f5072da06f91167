"""Gradient checking by central differences (notes, section 2.3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

EPSILON = 1e-4


def numerical_gradient(
    f: Callable[[np.ndarray], float],
    theta: np.ndarray,
    epsilon: float = EPSILON,
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Central differences ``(J(theta + eps e_i) - J(theta - eps e_i)) / (2 eps)``.

    Parameters
    ----------
    f : callable
        ``f(theta) -> J`` (a float) or ``-> (J, grad)`` (grad ignored).
    theta : ndarray of shape (n,)
    epsilon : float
    indices : sequence of int, optional
        Coordinates to check (default all).

    Returns
    -------
    num : ndarray of shape (len(indices),)
    """
    theta = np.array(theta, dtype=np.float64)
    idx = range(theta.size) if indices is None else indices
    out = np.empty(len(idx))

    def J(t: np.ndarray) -> float:
        v = f(t)
        return float(v[0] if isinstance(v, tuple) else v)

    for k, i in enumerate(idx):
        old = theta[i]
        theta[i] = old + epsilon
        plus = J(theta)
        theta[i] = old - epsilon
        minus = J(theta)
        theta[i] = old
        out[k] = (plus - minus) / (2 * epsilon)
    return out


def relative_difference(num: np.ndarray, ana: np.ndarray) -> float:
    """``||num - ana|| / ||num + ana||`` as in the notes."""
    num, ana = np.asarray(num, dtype=np.float64), np.asarray(ana, dtype=np.float64)
    denom = np.linalg.norm(num + ana)
    if denom == 0:
        return 0.0 if np.linalg.norm(num - ana) == 0 else np.inf
    return float(np.linalg.norm(num - ana) / denom)


def check_gradient(
    f: Callable[[np.ndarray], tuple[float, np.ndarray]],
    theta: np.ndarray,
    epsilon: float = EPSILON,
    n_coords: int | None = None,
    seed: int = 0,
) -> float:
    """Relative difference between the analytic gradient of ``f`` and central differences.

    Parameters
    ----------
    f : callable
        ``f(theta) -> (J, grad)``.
    theta : ndarray of shape (n,)
    epsilon : float
    n_coords : int, optional
        Check this many coordinates sampled without replacement (default: all).
    seed : int
        Seed of the coordinate sample.

    Returns
    -------
    diff : float
        ``||num - ana|| / ||num + ana||`` over the checked coordinates.
    """
    theta = np.asarray(theta, dtype=np.float64)
    _, grad = f(theta)
    if n_coords is None or n_coords >= theta.size:
        idx = np.arange(theta.size)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(theta.size, n_coords, replace=False))
    num = numerical_gradient(f, theta, epsilon, idx)
    return relative_difference(num, np.asarray(grad)[idx])
