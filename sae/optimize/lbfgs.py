"""Limited-memory BFGS with a strong-Wolfe line search (Nocedal & Wright, algorithm 7.4/7.5).

The search direction is ``-H grad`` by the two-loop recursion over the last ``memory`` pairs,
with ``H0 = (s'y / y'y) I`` from the newest pair. A pair with
``s'y <= 1e-10 ||s|| ||y||`` is skipped. Without pairs (first iteration, after a reset) the
direction is ``-grad`` and the first trial step ``min(1, 1 / ||grad||_1)``, as in minFunc.
If the line search fails along the L-BFGS direction, the memory is dropped and the search is
retried along ``-grad``; if that fails too the run stops with ``line_search_failed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sae.optimize.linesearch import CountedObjective, wolfe_search
from sae.optimize.state import OptimizerState

CURVATURE_EPS = 1e-10


def two_loop(grad: np.ndarray, s: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> np.ndarray:
    """The L-BFGS direction ``-H grad`` (two-loop recursion).

    Parameters
    ----------
    grad : ndarray of shape (n,)
    s, y : sequences of ndarray of shape (n,), oldest first, non-empty, ``s_i' y_i > 0``

    Returns
    -------
    p : ndarray of shape (n,)
    """
    rho = [1.0 / float(np.dot(yi, si)) for si, yi in zip(s, y, strict=True)]
    q = grad.copy()
    a = [0.0] * len(s)
    for i in reversed(range(len(s))):
        a[i] = rho[i] * float(np.dot(s[i], q))
        q -= a[i] * y[i]
    gamma = float(np.dot(s[-1], y[-1])) / float(np.dot(y[-1], y[-1]))
    r = gamma * q
    for i in range(len(s)):
        b = rho[i] * float(np.dot(y[i], r))
        r += (a[i] - b) * s[i]
    return -r


def steepest(grad: np.ndarray) -> np.ndarray:
    """``-grad`` scaled so that a unit step has length ``min(1, 1/||grad||_1)`` times grad."""
    return -min(1.0, 1.0 / float(np.sum(np.abs(grad)))) * grad


def step(fc: CountedObjective, state: OptimizerState) -> OptimizerState:
    """One L-BFGS iteration from ``state`` (status ``running``).

    Returns
    -------
    state : OptimizerState
        The next iterate with the updated memory, or ``state`` with status
        ``line_search_failed`` and an empty memory.
    """
    opts = state.options
    theta, J, g = state.theta, state.J, state.grad
    s, y = state.s, state.y
    p = two_loop(g, s, y) if s else steepest(g)
    if s and not float(np.dot(g, p)) < 0:  # lost positive definiteness numerically
        s, y, p = (), (), steepest(g)
    ls = {"c1": opts["c1"], "c2": opts["c2"], "maxiter": opts["ls_maxiter"]}
    found = wolfe_search(fc, theta, J, g, p, **ls)
    if found is None and s:
        s, y = (), ()
        found = wolfe_search(fc, theta, J, g, steepest(g), **ls)
    if found is None:
        return state.replace(
            s=(),
            y=(),
            status="line_search_failed",
            message=(
                f"lbfgs: line search failed along -grad at iteration {state.iteration} "
                f"(||grad||_inf = {state.grad_max_norm:.3e})"
            ),
        )
    s_new = found.theta - theta
    y_new = found.grad - g
    sy = float(np.dot(s_new, y_new))
    if sy > CURVATURE_EPS * float(np.linalg.norm(s_new)) * float(np.linalg.norm(y_new)):
        s, y = (*s, s_new)[-opts["memory"] :], (*y, y_new)[-opts["memory"] :]
    return state.replace(
        theta=found.theta,
        J=found.J,
        grad=found.grad,
        J_prev=J,
        iteration=state.iteration + 1,
        last_step=found.alpha,
        s=s,
        y=y,
    )
