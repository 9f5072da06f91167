"""The optimizer loop: evaluate, step, test for stopping, report, repeat."""

from __future__ import annotations

import math
from collections.abc import Callable

from sae.optimize import cg, gd, lbfgs
from sae.optimize.linesearch import CountedObjective, Objective
from sae.optimize.options import check_max_iter
from sae.optimize.state import FAILED, OptimizerState

Callback = Callable[[OptimizerState], bool | None]

#: method name -> one iteration ``step(fc, state) -> state``.
STEPS = {"lbfgs": lbfgs.step, "cg": cg.step, "gd": gd.step}


def stop_reason(state: OptimizerState, max_iter: int) -> tuple[str, str] | None:
    """``(status, message)`` if a stopping test holds for ``state``, else None.

    Tests, in order: ``||grad||_inf <= gtol``; ``|J_prev - J| <= ftol max(|J_prev|, |J|, 1)``;
    ``iteration >= max_iter``. A pure function of the state, so it gives the same answer on a
    loaded state as in the run that saved it.
    """
    opts = state.options
    gnorm = state.grad_max_norm
    if gnorm <= opts["gtol"]:
        return "converged", f"gradient norm {gnorm:.3e} <= gtol {opts['gtol']:.3e}"
    if state.J_prev is not None:
        change = abs(state.J_prev - state.J)
        scale = max(abs(state.J_prev), abs(state.J), 1.0)
        if change <= opts["ftol"] * scale:
            return "converged", (
                f"relative cost change {change / scale:.3e} <= ftol {opts['ftol']:.3e}"
            )
    if state.iteration >= max_iter:
        return "max_iter", f"reached max_iter={max_iter}"
    return None


def _initial(fc: CountedObjective, state: OptimizerState) -> OptimizerState:
    J, grad = fc(state.theta)
    if not math.isfinite(J):
        why = f" ({fc.last_error})" if fc.last_error else ""
        raise FloatingPointError(
            f"objective: cost or gradient is not finite at theta0{why}; check the data and theta0"
        )
    return state.replace(J=J, grad=grad, iteration=0, status="running", message="")


def _report(state: OptimizerState, max_iter: int, callback: Callback | None) -> OptimizerState:
    reason = stop_reason(state, max_iter)
    if reason is not None:
        state = state.replace(status=reason[0], message=reason[1])
    if callback is not None and callback(state) and state.status == "running":
        state = state.replace(
            status="cancelled", message=f"cancelled by the callback at iteration {state.iteration}"
        )
    return state


def minimize(
    f: Objective,
    state: OptimizerState,
    max_iter: int = 400,
    callback: Callback | None = None,
) -> OptimizerState:
    """Run (or continue) an optimizer until a stopping test holds.

    Parameters
    ----------
    f : callable
        ``f(theta) -> (J, grad)`` with theta and grad of shape (n,), J a float. Raising
        ``FloatingPointError`` (as :func:`sae.cost` does) or returning non-finite values at a
        trial point makes the line search backtrack.
    state : OptimizerState
        From :meth:`OptimizerState.start` or :meth:`OptimizerState.load`; not modified.
    max_iter : int
        Total iteration budget, counted from the start of the run (not of this call), so a
        loaded state continued with a larger ``max_iter`` carries on its trajectory.
    callback : callable, optional
        ``callback(state) -> bool | None`` after the initial evaluation (iteration 0) and after
        every iteration, with the stopping tests already applied to ``state.status``; returning
        a true value stops the run with status ``cancelled`` (the state can be continued later).

    Returns
    -------
    state : OptimizerState
        The last state, ``status`` one of ``converged``, ``max_iter``, ``cancelled``,
        ``line_search_failed`` or ``diverged``. A state that failed is returned unchanged.

    Raises
    ------
    FloatingPointError
        If the cost or gradient at theta0 is not finite.
    ValueError
        For an invalid ``max_iter`` or a gradient of the wrong shape.
    """
    max_iter = check_max_iter(max_iter)
    if state.status in FAILED:
        return state
    fc = CountedObjective(f)
    base = state.n_evals
    if state.J is None:
        state = _initial(fc, state).replace(n_evals=base + fc.n_evals)
        state = _report(state, max_iter, callback)
    else:
        fc.seed(state.theta, state.J, state.grad)
        state = state.replace(status="running", message="")
        reason = stop_reason(state, max_iter)
        if reason is not None:
            return state.replace(status=reason[0], message=reason[1])
    step = STEPS[state.method]
    while state.status == "running":
        state = step(fc, state).replace(n_evals=base + fc.n_evals)
        if state.status in FAILED:
            break
        state = _report(state, max_iter, callback)
    return state
