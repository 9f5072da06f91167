"""Batch gradient descent with a fixed learning rate: ``theta <- theta - alpha * grad``."""

from __future__ import annotations

import math

from sae.optimize.linesearch import CountedObjective
from sae.optimize.state import OptimizerState


def step(fc: CountedObjective, state: OptimizerState) -> OptimizerState:
    """One gradient-descent iteration from ``state`` (status ``running``).

    Returns
    -------
    state : OptimizerState
        The next iterate, or ``state`` with status ``diverged`` when the cost at the new
        point is not finite (the state keeps the last finite iterate).
    """
    alpha = state.options["alpha"]
    theta = state.theta - alpha * state.grad
    J, grad = fc(theta)
    if not math.isfinite(J):
        return state.replace(
            status="diverged",
            message=(
                f"gd: cost or gradient not finite after iteration {state.iteration} "
                f"with alpha={alpha!r}; lower alpha"
            ),
        )
    return state.replace(
        theta=theta,
        J=J,
        grad=grad,
        J_prev=state.J,
        iteration=state.iteration + 1,
        last_step=alpha,
    )
