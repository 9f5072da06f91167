"""Full-batch optimizers whose whole state can be saved and resumed bit for bit.

>>> from sae.optimize import OptimizerState, minimize
>>> state = OptimizerState.start("lbfgs", theta0, {"memory": 20})   # doctest: +SKIP
>>> state = minimize(f, state, max_iter=400, callback=cb)            # doctest: +SKIP
>>> state.save("run.npz"); state = OptimizerState.load("run.npz")    # doctest: +SKIP

``save`` writes ``run.npz`` and, for L-BFGS, the folder ``run.npz.pairs/`` (one write-once
file per memory pair, so a checkpoint per iteration costs O(n) bytes); copy or delete both.

Methods (:data:`OPTIMIZERS` lists their options and defaults):

- ``"lbfgs"`` (default): L-BFGS, two-loop recursion, strong-Wolfe line search.
- ``"cg"``: nonlinear conjugate gradient, Polak-Ribiere+, strong-Wolfe line search.
- ``"gd"``: batch gradient descent ``theta <- theta - alpha * grad``.
"""

from sae.optimize.linesearch import CountedObjective, Objective, wolfe_search
from sae.optimize.minimize import STEPS, minimize, stop_reason
from sae.optimize.options import (
    DEFAULT_METHOD,
    OPTIMIZERS,
    check_max_iter,
    check_method,
    check_options,
)
from sae.optimize.state import FAILED, PAIRS_SUFFIX, STATUSES, OptimizerState

__all__ = [
    "DEFAULT_METHOD",
    "FAILED",
    "OPTIMIZERS",
    "PAIRS_SUFFIX",
    "STATUSES",
    "STEPS",
    "CountedObjective",
    "Objective",
    "OptimizerState",
    "check_max_iter",
    "check_method",
    "check_options",
    "minimize",
    "stop_reason",
    "wolfe_search",
]
