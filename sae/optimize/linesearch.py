"""The objective seen by an optimizer: cached, counted, and scipy's strong-Wolfe line search.

scipy's :func:`scipy.optimize.line_search` asks for the cost and the gradient at each trial
point through two callables; :class:`CountedObjective` answers both from one evaluation of
``f(theta) -> (J, grad)`` with a one-entry cache keyed on the bits of theta.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.optimize import line_search

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]

# scipy warns (LineSearchWarning, a RuntimeWarning) when its search fails; the optimizer
# reports failures through the state instead. The class lives in a private module, so match
# the messages. (warnings.catch_warnings is process-global: a concurrent thread may see the
# filter while it is active, or two overlapping searches may leave it in place for good; it
# only ever hides these same messages, and a lock would make concurrent jobs' line searches,
# which evaluate the objective, wait for each other.)
_LS_MESSAGES = r"(The line search algorithm|Rounding errors prevent the line search)"


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


class CountedObjective:
    """``f`` with a one-entry cache and a count of real evaluations.

    Parameters
    ----------
    f : callable
        ``f(theta) -> (J, grad)``, theta and grad of shape (n,).

    Attributes
    ----------
    n_evals : int
        Calls of ``f`` made through this object (cache hits are not counted).
    last_error : str or None
        Why the last evaluation was not finite, if it was not.
    """

    def __init__(self, f: Objective) -> None:
        self.f = f
        self.n_evals = 0
        self.last_error: str | None = None
        self._key: np.ndarray | None = None
        self._value: tuple[float, np.ndarray] | None = None

    def seed(self, theta: np.ndarray, J: float, grad: np.ndarray) -> None:
        """Put a known ``(J, grad)`` at theta in the cache (a resumed run does this so that it
        evaluates exactly where the uninterrupted run would)."""
        self._key = np.array(theta, dtype=np.float64)
        self._value = (J, grad)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """``(J, grad)`` at theta; ``J = inf`` when f raises FloatingPointError or returns a
        non-finite cost or gradient (the line search then backtracks).

        Returns
        -------
        J : float
        grad : ndarray of shape (n,), float64, not shared with ``f``
        """
        theta = np.asarray(theta, dtype=np.float64)
        if self._key is not None and _same_bits(theta, self._key):
            return self._value
        key = theta.copy()
        self.n_evals += 1
        self.last_error = None
        try:
            J, grad = self.f(theta)
            J = float(J)
            grad = np.array(grad, dtype=np.float64)
        except FloatingPointError as e:
            J, grad = math.inf, np.full(theta.shape, np.nan)
            self.last_error = str(e)
        if grad.shape != theta.shape:
            raise ValueError(f"objective: gradient has shape {grad.shape}, expected {theta.shape}")
        if not (math.isfinite(J) and np.all(np.isfinite(grad))):
            self.last_error = self.last_error or "non-finite cost or gradient"
            J = math.inf
        self._key, self._value = key, (J, grad)
        return self._value

    def value(self, theta: np.ndarray) -> float:
        """The cost at theta (for scipy's line search)."""
        return self(theta)[0]

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        """The gradient at theta (for scipy's line search)."""
        return self(theta)[1]


class Step(NamedTuple):
    """An accepted step ``theta_new = theta + alpha * p``."""

    alpha: float
    theta: np.ndarray
    J: float
    grad: np.ndarray


def wolfe_search(
    fc: CountedObjective,
    theta: np.ndarray,
    J: float,
    grad: np.ndarray,
    p: np.ndarray,
    *,
    c1: float,
    c2: float,
    maxiter: int,
    J_prev: float | None = None,
) -> Step | None:
    """A step along ``p`` meeting the strong Wolfe conditions, or None if the search fails.

    Uses :func:`scipy.optimize.line_search`. The first trial step is 1, or with ``J_prev``
    the interpolation ``min(1, 2.02 (J - J_prev) / (grad' p))``.

    Parameters
    ----------
    fc : CountedObjective
    theta, grad, p : ndarray of shape (n,)
        Current point, gradient there and a descent direction (``grad' p < 0``).
    J : float
        Cost at theta.
    c1, c2 : float
        Sufficient decrease and curvature constants, ``0 < c1 < c2 < 1``.
    maxiter : int
        Bracketing iterations.
    J_prev : float, optional
        Cost at the previous iterate, for the initial step guess.

    Returns
    -------
    step : Step or None
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LS_MESSAGES, category=RuntimeWarning)
        alpha, _, _, _, _, slope = line_search(
            fc.value,
            fc.gradient,
            theta,
            p,
            gfk=grad,
            old_fval=J,
            old_old_fval=J_prev,
            c1=c1,
            c2=c2,
            maxiter=maxiter,
        )
    # slope is None when the search did not meet the Wolfe conditions, even if alpha is set
    if alpha is None or slope is None or not alpha > 0:
        return None
    theta_new = theta + alpha * p  # the same expression, hence bits, as scipy's trial point
    J_new, grad_new = fc(theta_new)
    if not math.isfinite(J_new) or _same_bits(theta_new, theta):
        return None
    return Step(float(alpha), theta_new, J_new, grad_new)
