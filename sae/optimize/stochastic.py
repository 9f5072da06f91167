"""Stochastic optimizers over minibatches: Adam and SGD, with saveable state.

One step reads the gradient of one minibatch's objective and updates the parameters::

    Adam:  m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
           theta <- theta - lr_t * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    SGD:   u <- mu u + g                  (heavy ball, as PyTorch writes it)
           theta <- theta - lr_t * (g + mu u  if nesterov  else  u)

``g`` is first scaled to norm ``clip_norm`` when it is longer. The learning rate ``lr_t`` of
step ``t`` (0-based) rises linearly over ``warmup_steps`` and then stays constant or decays to
zero at the last step along a cosine or a line (:func:`learning_rate`).

:class:`StochasticState` holds everything the next step reads (parameters, moments, the step,
the epoch and the position in it, the running average of the sparse layers' activations), and
:meth:`StochasticState.save` writes it exactly: a run stopped after step k, saved, loaded and
continued follows the uninterrupted trajectory bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sae.atomic import atomic_write

FORMAT = "sae.optimize.stochastic/1"

#: Options of each method and their defaults.
STOCHASTIC: dict[str, dict[str, Any]] = {
    "adam": {
        "learning_rate": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "schedule": "constant",
        "warmup_steps": 0,
        "clip_norm": None,
    },
    "sgd": {
        "learning_rate": 1e-2,
        "momentum": 0.9,
        "nesterov": False,
        "schedule": "constant",
        "warmup_steps": 0,
        "clip_norm": None,
    },
}
SCHEDULES = ("constant", "cosine", "linear")


def stochastic_options(method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of ``method`` with defaults filled in, checked.

    Raises
    ------
    ValueError
        Naming the option: an unknown method, option or schedule, a learning rate that is not
        positive, betas or momentum outside [0, 1), a negative warmup.
    """
    if method not in STOCHASTIC:
        raise ValueError(f"optimizer: choose one of {sorted(STOCHASTIC)}, got {method!r}")
    given = {k: v for k, v in dict(options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(STOCHASTIC[method]))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of {method} ({sorted(STOCHASTIC[method])})")
    opts = {**STOCHASTIC[method], **given}
    lr = float(opts["learning_rate"])
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate: must be a finite number > 0, got {lr!r}")
    for name in ("beta1", "beta2", "momentum"):
        if name in opts and not 0 <= float(opts[name]) < 1:
            raise ValueError(f"{name}: must be in [0, 1), got {opts[name]!r}")
    if "eps" in opts and not float(opts["eps"]) > 0:
        raise ValueError(f"eps: must be > 0, got {opts['eps']!r}")
    if opts["schedule"] not in SCHEDULES:
        raise ValueError(f"lr_schedule: choose one of {SCHEDULES}, got {opts['schedule']!r}")
    if int(opts["warmup_steps"]) < 0:
        raise ValueError(f"warmup_steps: must be >= 0, got {opts['warmup_steps']!r}")
    if opts["clip_norm"] is not None and not float(opts["clip_norm"]) > 0:
        raise ValueError(f"clip_grad_norm: must be > 0, got {opts['clip_norm']!r}")
    return opts


def learning_rate(options: Mapping[str, Any], step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps``
    steps; then ``lr`` (constant), or a decay to 0 at the last step along a half cosine or a
    line.
    """
    lr, warmup = float(options["learning_rate"]), int(options["warmup_steps"])
    if step < warmup:
        return lr * (step + 1) / warmup
    if options["schedule"] == "constant":
        return lr
    span = max(total_steps - warmup, 1)
    frac = min(max((step - warmup) / span, 0.0), 1.0)
    if options["schedule"] == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr * (1.0 - frac)


@dataclass(frozen=True, eq=False)
class StochasticState:
    """Everything the next step of a stochastic optimizer reads.

    Attributes
    ----------
    method : {"adam", "sgd"}
    options : dict
        :func:`stochastic_options` of the method.
    theta : ndarray of shape (n,)
    m, v : ndarray of shape (n,) or None
        Adam's first and second moments; SGD's velocity is ``m``.
    step : int
        Steps taken.
    epoch, batch : int
        Where the next step reads: batch ``batch`` of epoch ``epoch`` (0-based).
    samples : int
        Rows read so far.
    J : float or None
        Cost of the last step's batch; ``grad_norm`` the 2-norm of its gradient.
    rho_ema : dict of str to ndarray
        Running average of each sparse layer's mean activation (``"a2"``: layer 2 ...), when
        the sparsity penalty uses one.
    best_val : float or None
        The best held-out cost so far, at step ``best_step``; ``stale`` counts the held-out
        costs since (early stopping).
    status, message : str
        ``"running"``, ``"max_iter"`` (budget used) or ``"cancelled"``, and why.
    """

    method: str
    options: dict
    theta: np.ndarray
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    J: float | None = None
    grad_norm: float | None = None
    rho_ema: dict = field(default_factory=dict)
    best_val: float | None = None
    best_step: int = 0
    stale: int = 0
    status: str = "running"
    message: str = ""

    @classmethod
    def start(cls, method: str, theta0: np.ndarray, options: Mapping | None = None):
        """The state before the first step."""
        theta = np.array(theta0, dtype=np.float64, copy=True)
        if theta.ndim != 1 or theta.size == 0 or not np.all(np.isfinite(theta)):
            raise ValueError("theta0: expected a non-empty finite vector")
        return cls(method=method, options=stochastic_options(method, options), theta=theta)

    @property
    def iteration(self) -> int:
        """Steps taken (the history's ``iteration``)."""
        return self.step

    def replace(self, **changes: Any) -> StochasticState:
        """A copy with some fields changed."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path`` (npz), atomically and fsynced."""
        meta = {
            "format": FORMAT,
            "method": self.method,
            "options": self.options,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "samples": self.samples,
            "J": None if self.J is None else repr(float(self.J)),
            "grad_norm": None if self.grad_norm is None else repr(float(self.grad_norm)),
            "best_val": None if self.best_val is None else repr(float(self.best_val)),
            "best_step": self.best_step,
            "stale": self.stale,
            "status": self.status,
            "message": self.message,
        }
        arrays = {"meta": np.array(json.dumps(meta)), "theta": self.theta}
        for name in ("m", "v"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        for key, value in self.rho_ema.items():
            arrays[f"rho_ema_{key}"] = value
        atomic_write(path, lambda fh: np.savez(fh, **arrays), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StochasticState:
        """Read a state written by :meth:`save`.

        Raises
        ------
        ValueError
            If the file is not a stochastic optimizer's state.
        """
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"][()]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"state: {path} is not a state of format {FORMAT!r}")
            arrays = {k: np.array(npz[k], dtype=np.float64) for k in npz.files if k != "meta"}

        def num(name: str) -> float | None:
            return None if meta[name] is None else float(meta[name])

        return cls(
            method=meta["method"],
            options=stochastic_options(meta["method"], meta["options"]),
            theta=arrays["theta"],
            m=arrays.get("m"),
            v=arrays.get("v"),
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            batch=int(meta["batch"]),
            samples=int(meta["samples"]),
            J=num("J"),
            grad_norm=num("grad_norm"),
            best_val=num("best_val"),
            best_step=int(meta["best_step"]),
            stale=int(meta["stale"]),
            rho_ema={
                k[len("rho_ema_") :]: v for k, v in arrays.items() if k.startswith("rho_ema_")
            },
            status=str(meta["status"]),
            message=str(meta["message"]),
        )


def clip(grad: np.ndarray, clip_norm: float | None) -> tuple[np.ndarray, float]:
    """``grad`` scaled to norm ``clip_norm`` when longer, and its norm before clipping."""
    norm = float(np.linalg.norm(grad))
    if clip_norm is not None and norm > clip_norm:
        return grad * (float(clip_norm) / norm), norm
    return grad, norm


#: Elements of the arrays an Adam step handles at once: its temporaries stay in the L2 cache.
STEP_BLOCK = 16384


def _adam(theta, m, v, g, b1: float, b2: float, t: int, lr: float, eps: float):
    """Adam's update, block by block: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``
    (``m``, ``v`` None: zero), ``theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``,
    each operation the one the whole-array expression does, in its order (elementwise IEEE
    operations: the same bits), in ten passes over blocks that fit the cache instead of ten
    over arrays that do not.

    Returns
    -------
    theta, m, v : ndarray of shape (n,)
    """
    n = g.shape[0]
    new_theta, new_m, new_v = np.empty(n), np.empty(n), np.empty(n)
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    buf_a, buf_b = np.empty(min(n, STEP_BLOCK)), np.empty(min(n, STEP_BLOCK))
    for s in range(0, n, STEP_BLOCK):
        e = min(n, s + STEP_BLOCK)
        gs, a, b = g[s:e], buf_a[: e - s], buf_b[: e - s]
        mo, vo = new_m[s:e], new_v[s:e]
        np.multiply(gs, 1.0 - b1, out=mo)
        if m is not None:
            np.add(np.multiply(m[s:e], b1, out=a), mo, out=mo)
        np.multiply(np.multiply(gs, gs, out=b), 1.0 - b2, out=vo)
        if v is not None:
            np.add(np.multiply(v[s:e], b2, out=a), vo, out=vo)
        np.add(np.sqrt(np.divide(vo, c2, out=b), out=b), eps, out=b)
        np.multiply(np.divide(mo, c1, out=a), lr, out=a)
        np.subtract(theta[s:e], np.divide(a, b, out=a), out=new_theta[s:e])
    return new_theta, new_m, new_v


def step(state: StochasticState, grad: np.ndarray, lr: float) -> StochasticState:
    """The state after one step along ``grad`` (the batch's gradient) with learning rate
    ``lr``; the caller moves ``epoch``, ``batch``, ``samples`` and ``J``."""
    o = state.options
    g, norm = clip(np.asarray(grad, dtype=np.float64), o["clip_norm"])
    t = state.step + 1
    if state.method == "adam":
        b1, b2 = float(o["beta1"]), float(o["beta2"])
        theta, m, v = _adam(state.theta, state.m, state.v, g, b1, b2, t, lr, float(o["eps"]))
        return state.replace(theta=theta, m=m, v=v, step=t, grad_norm=norm)
    mu = float(o["momentum"])
    u = g.copy() if state.m is None else mu * state.m + g
    d = g + mu * u if o["nesterov"] else u
    return state.replace(theta=state.theta - lr * d, m=u, step=t, grad_norm=norm)
