"""Nonlinear conjugate gradient, Polak-Ribiere+ with a strong-Wolfe line search.

``d = -grad + beta d_prev`` with ``beta = max(0, grad' (grad - g_prev) / g_prev' g_prev)``
(Nocedal & Wright, eq. 5.45); the direction restarts at ``-grad`` when it is not a descent
direction. The first trial step is ``min(1, 2.02 (J - J_prev) / (grad' d))``, or
``min(1, 1/||grad||_1)`` along ``-grad`` on the first iteration. A failed line search is
retried along ``-grad``; if that fails too the run stops with ``line_search_failed``.
"""

from __future__ import annotations

import numpy as np

from sae.optimize.lbfgs import steepest
from sae.optimize.linesearch import CountedObjective, wolfe_search
from sae.optimize.state import OptimizerState


def direction(
    grad: np.ndarray, g_prev: np.ndarray | None, d_prev: np.ndarray | None
) -> np.ndarray | None:
    """The PR+ direction, or None to restart along ``-grad``.

    Parameters
    ----------
    grad : ndarray of shape (n,)
    g_prev, d_prev : ndarray of shape (n,) or None

    Returns
    -------
    d : ndarray of shape (n,) or None
    """
    if d_prev is None or g_prev is None:
        return None
    beta = max(0.0, float(np.dot(grad, grad - g_prev)) / float(np.dot(g_prev, g_prev)))
    d = -grad + beta * d_prev
    return d if float(np.dot(grad, d)) < 0 else None


def step(fc: CountedObjective, state: OptimizerState) -> OptimizerState:
    """One CG iteration from ``state`` (status ``running``).

    Returns
    -------
    state : OptimizerState
        The next iterate, or ``state`` with status ``line_search_failed``.
    """
    opts = state.options
    theta, J, g = state.theta, state.J, state.grad
    ls = {"c1": opts["c1"], "c2": opts["c2"], "maxiter": opts["ls_maxiter"]}
    d = direction(g, state.g_prev, state.d_prev)
    if d is None:
        d = -g
    if state.J_prev is None:  # first iteration
        found = wolfe_search(fc, theta, J, g, steepest(g), **ls)
    else:
        found = wolfe_search(fc, theta, J, g, d, J_prev=state.J_prev, **ls)
        if found is None:
            d = -g
            found = wolfe_search(fc, theta, J, g, steepest(g), **ls)
    if found is None:
        return state.replace(
            status="line_search_failed",
            message=(
                f"cg: line search failed along -grad at iteration {state.iteration} "
                f"(||grad||_inf = {state.grad_max_norm:.3e})"
            ),
        )
    return state.replace(
        theta=found.theta,
        J=found.J,
        grad=found.grad,
        J_prev=J,
        iteration=state.iteration + 1,
        last_step=found.alpha,
        d_prev=d,
        g_prev=g,
    )
