"""The optimizer registry: method names, their options and the defaults.

Every method stops on ``||grad||_inf <= gtol`` and on a relative cost change
``|J_prev - J| <= ftol * max(|J_prev|, |J|, 1)``; ``max_iter`` is an argument of
:func:`sae.optimize.minimize`, not an option, so that a saved run can be continued further.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

_COMMON = {"gtol": 1e-5, "ftol": 0.0}

#: method name -> default options (read-only).
OPTIMIZERS: Mapping[str, Mapping[str, float | int]] = MappingProxyType(
    {
        "lbfgs": MappingProxyType(
            {**_COMMON, "memory": 20, "c1": 1e-4, "c2": 0.9, "ls_maxiter": 10}
        ),
        "cg": MappingProxyType({**_COMMON, "c1": 1e-4, "c2": 0.2, "ls_maxiter": 10}),
        "gd": MappingProxyType({**_COMMON, "alpha": 0.1}),
    }
)

DEFAULT_METHOD = "lbfgs"


def check_method(method: str) -> str:
    """Return ``method`` if it names a registered optimizer, else raise ValueError."""
    if method not in OPTIMIZERS:
        raise ValueError(
            f"optimizer: unknown optimizer {method!r}; choose one of {sorted(OPTIMIZERS)}"
        )
    return method


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return value


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_max_iter(max_iter: object) -> int:
    """Validate the iteration budget: an integer >= 0."""
    return _integer("max_iter", max_iter, 0)


def check_options(method: str, options: Mapping[str, object] | None = None) -> dict:
    """Fill in defaults and validate the options of one method.

    Parameters
    ----------
    method : str
        A key of :data:`OPTIMIZERS`.
    options : mapping, optional
        Any of the method's option names (see :data:`OPTIMIZERS`).

    Returns
    -------
    options : dict
        All options of the method, with plain ``int``/``float`` values.

    Raises
    ------
    ValueError
        Naming the unknown method, the unknown option or the invalid argument.
    """
    defaults = OPTIMIZERS[check_method(method)]
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"options: unknown option(s) {unknown} for optimizer {method!r}; "
            f"valid: {sorted(defaults)}"
        )
    out: dict = {**defaults, **options}
    for name in ("gtol", "ftol"):
        out[name] = _number(name, out[name])
        if out[name] < 0:
            raise ValueError(f"{name}: must be >= 0, got {out[name]!r}")
    if "alpha" in out:
        out["alpha"] = _number("alpha", out["alpha"])
        if out["alpha"] <= 0:
            raise ValueError(f"alpha: the learning rate must be > 0, got {out['alpha']!r}")
    if "memory" in out:
        out["memory"] = _integer("memory", out["memory"], 1)
    if "ls_maxiter" in out:
        out["ls_maxiter"] = _integer("ls_maxiter", out["ls_maxiter"], 1)
    if "c1" in out:
        c1, c2 = _number("c1", out["c1"]), _number("c2", out["c2"])
        if not 0 < c1 < 1:
            raise ValueError(f"c1: must lie in (0, 1), got {c1!r}")
        if not c1 < c2 < 1:
            raise ValueError(f"c2: must lie in (c1, 1) = ({c1!r}, 1), got {c2!r}")
        out["c1"], out["c2"] = c1, c2
    return out
