"""Optimizers: convergence, the sparse autoencoder, bitwise resume, atomic save, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
from scipy.optimize import rosen, rosen_der

import sae
from sae.optimize import (
    OPTIMIZERS,
    CountedObjective,
    OptimizerState,
    minimize,
    wolfe_search,
)
from sae.optimize import state as state_module

METHODS = sorted(OPTIMIZERS)


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.int64)


def quadratic(n: int = 10, seed: int = 0):
    """``f(x) = 1/2 (x - x*)' A (x - x*)``, A SPD with condition ~ 10: (f, x*, largest eig).

    Written around the minimiser so that J -> 0 keeps full relative precision near it.
    """
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    A = M @ M.T / n + np.eye(n)
    x_star = rng.standard_normal(n)

    def f(x):
        r = x - x_star
        Ar = A @ r
        return 0.5 * float(r @ Ar), Ar

    return f, x_star, float(np.linalg.eigvalsh(A)[-1])


def rosenbrock(x):
    return float(rosen(x)), rosen_der(x)


def record(into: list):
    def cb(state: OptimizerState) -> None:
        into.append(state)

    return cb


@pytest.fixture(scope="module")
def sae_problem():
    net = sae.Network.autoencoder(16, 6, lam=1e-3, rho=0.1, beta=3)
    X = np.random.default_rng(42).uniform(0.0, 1.0, size=(200, 16))

    def f(theta):
        return sae.cost(net, theta, X)

    return f, net.init_theta(0)


# ------------------------------------------------------------------ convergence
@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_quadratic_to_minimiser(method):
    f, x_star, _ = quadratic()
    state = minimize(f, OptimizerState.start(method, np.zeros(10), {"gtol": 1e-12}), 200)
    assert state.status == "converged", state.message
    np.testing.assert_allclose(state.theta, x_star, rtol=0, atol=1e-11)


def test_quadratic_gd_monotone_and_converges():
    f, x_star, L = quadratic()
    seen: list[OptimizerState] = []
    state = OptimizerState.start("gd", np.zeros(10), {"alpha": 1.0 / L, "gtol": 1e-8})
    state = minimize(f, state, max_iter=5000, callback=record(seen))
    Js = np.array([s.J for s in seen])
    assert np.all(np.diff(Js) < 0)
    assert state.status == "converged", state.message
    np.testing.assert_allclose(state.theta, x_star, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_rosenbrock_to_minimiser(method):
    x0 = np.array([-1.2, 1.0] * 3)
    state = minimize(rosenbrock, OptimizerState.start(method, x0, {"gtol": 1e-10}), 2000)
    assert state.status == "converged", state.message
    np.testing.assert_allclose(state.theta, np.ones(6), rtol=0, atol=1e-8)
    assert state.J < 1e-16


def test_rosenbrock_gd_monotone():
    seen: list[OptimizerState] = []
    x0 = np.array([-1.2, 1.0])
    state = OptimizerState.start("gd", x0, {"alpha": 1e-3})
    state = minimize(rosenbrock, state, max_iter=3000, callback=record(seen))
    Js = np.array([s.J for s in seen])
    assert len(Js) == 3001 and state.status == "max_iter"
    assert np.all(np.diff(Js) <= 0)
    assert Js[-1] < 0.01 * Js[0]


# ------------------------------------------------------------------ sparse autoencoder
@pytest.mark.parametrize(("method", "options"), [("lbfgs", {}), ("cg", {}), ("gd", {"alpha": 0.5})])
def test_sae_cost_decreases(sae_problem, method, options):
    f, theta0 = sae_problem
    J0 = f(theta0)[0]
    state = minimize(f, OptimizerState.start(method, theta0, options), max_iter=60)
    assert state.status == "max_iter"
    assert state.iteration == 60
    assert state.J < 0.9 * J0
    J_check, grad_check = f(state.theta)
    assert J_check == state.J
    np.testing.assert_array_equal(grad_check, state.grad)


def test_sae_lbfgs_within_one_percent_of_scipy(sae_problem):
    f, theta0 = sae_problem
    budget = 100
    ours = minimize(f, OptimizerState.start("lbfgs", theta0), max_iter=budget)
    ref = scipy.optimize.minimize(
        f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": budget}
    )
    assert ours.iteration <= budget
    assert ours.J <= 1.01 * ref.fun, (ours.J, ref.fun)


def test_n_evals_counts_real_calls(sae_problem):
    f, theta0 = sae_problem
    calls = []

    def counted(theta):
        calls.append(1)
        return f(theta)

    state = minimize(counted, OptimizerState.start("lbfgs", theta0), max_iter=15)
    assert state.n_evals == len(calls) >= 16


# ------------------------------------------------------------------ bitwise resume
RESUME_CASES = [("lbfgs", {"memory": 5}), ("lbfgs", {}), ("cg", {}), ("gd", {"alpha": 0.5})]


@pytest.mark.bitwise
@pytest.mark.parametrize(("method", "options"), RESUME_CASES)
def test_resume_is_bitwise(sae_problem, tmp_path, method, options):
    f, theta0 = sae_problem
    N, k = 30, 12
    full: list[OptimizerState] = []
    end = minimize(f, OptimizerState.start(method, theta0, options), N, record(full))
    assert [s.iteration for s in full] == list(range(N + 1))

    def stop_at_k(state):
        return state.iteration == k

    first = minimize(f, OptimizerState.start(method, theta0, options), N, stop_at_k)
    assert first.status == "cancelled" and first.iteration == k
    path = tmp_path / "state.npz"
    first.save(path)
    loaded = OptimizerState.load(path)
    assert loaded is not first
    rest: list[OptimizerState] = []
    end2 = minimize(f, loaded, N, record(rest))
    assert [s.iteration for s in rest] == list(range(k + 1, N + 1))
    for a, b in zip(full[k + 1 :], rest, strict=True):
        assert np.array_equal(bits(a.theta), bits(b.theta)), f"iteration {a.iteration}"
        assert np.array_equal(bits(a.grad), bits(b.grad))
        assert a.J == b.J and a.n_evals == b.n_evals and a.last_step == b.last_step
    assert end2.status == end.status == "max_iter"
    assert end2.n_evals == end.n_evals


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import sae
    from sae.optimize import OptimizerState, minimize

    path, max_iter = sys.argv[1], int(sys.argv[2])
    net = sae.Network.autoencoder(16, 6, lam=1e-3, rho=0.1, beta=3)
    X = np.random.default_rng(42).uniform(0.0, 1.0, size=(200, 16))
    try:
        state = OptimizerState.load(path)
    except FileNotFoundError:
        state = OptimizerState.start("lbfgs", net.init_theta(0), {"memory": 5})
    minimize(lambda t: sae.cost(net, t, X), state, max_iter).save(path)
    """
)


@pytest.mark.bitwise
def test_resume_in_a_new_process_is_bitwise(sae_problem, tmp_path):
    """As a restarted service does: save in one process, continue in another."""
    f, theta0 = sae_problem
    straight = minimize(f, OptimizerState.start("lbfgs", theta0, {"memory": 5}), 25)
    path = tmp_path / "run.npz"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for budget in (9, 25):
        cmd = [sys.executable, "-c", _PROCESS_SCRIPT, str(path), str(budget)]
        subprocess.run(cmd, check=True, env=env, timeout=300)
    resumed = OptimizerState.load(path)
    assert resumed.iteration == 25 and resumed.status == "max_iter"
    assert np.array_equal(bits(resumed.theta), bits(straight.theta))
    assert resumed.J == straight.J and resumed.n_evals == straight.n_evals


@pytest.mark.parametrize(("method", "options"), RESUME_CASES[1:])
def test_continue_with_larger_budget(sae_problem, method, options):
    f, theta0 = sae_problem
    straight = minimize(f, OptimizerState.start(method, theta0, options), 20)
    part = minimize(f, OptimizerState.start(method, theta0, options), 8)
    assert part.status == "max_iter" and part.iteration == 8
    more = minimize(f, part, 20)
    assert np.array_equal(bits(more.theta), bits(straight.theta))
    assert more.n_evals == straight.n_evals


def test_save_load_round_trip(sae_problem, tmp_path):
    f, theta0 = sae_problem
    for method in METHODS:
        state = minimize(f, OptimizerState.start(method, theta0), 7)
        state.save(tmp_path / f"{method}.npz")
        back = OptimizerState.load(tmp_path / f"{method}.npz")
        for name in ("method", "iteration", "n_evals", "status", "message", "J", "J_prev"):
            assert getattr(back, name) == getattr(state, name), name
        assert back.last_step == state.last_step
        assert dict(back.options) == dict(state.options)
        for name in ("theta", "grad", "d_prev", "g_prev"):
            a, b = getattr(state, name), getattr(back, name)
            assert (a is None and b is None) or np.array_equal(bits(a), bits(b)), name
        assert len(back.s) == len(state.s) == (7 if method == "lbfgs" else 0)
        for a, b in zip(state.s + state.y, back.s + back.y, strict=True):
            assert np.array_equal(bits(a), bits(b))


def test_pending_state_round_trip(tmp_path):
    state = OptimizerState.start("cg", np.arange(3.0), {"gtol": 1e-3})
    state.save(tmp_path / "s.npz")
    back = OptimizerState.load(tmp_path / "s.npz")
    assert back.status == "pending" and back.J is None and back.grad is None
    assert back.options["gtol"] == 1e-3


# ------------------------------------------------------------------ atomic save
def _listing(path):
    return sorted(os.listdir(path))


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "state.npz"
    old = OptimizerState.start("lbfgs", np.zeros(4))
    new = OptimizerState.start("gd", np.ones(4), {"alpha": 0.25})
    old.save(path)
    new.save(path)
    assert _listing(tmp_path) == ["state.npz"]
    assert OptimizerState.load(path).method == "gd"

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(state_module.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        old.save(path)
    assert _listing(tmp_path) == ["state.npz"]
    loaded = OptimizerState.load(path)
    assert loaded.method == "gd" and np.array_equal(loaded.theta, np.ones(4))


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", meta=np.array('{"format": "other"}'))
    with pytest.raises(ValueError, match="state"):
        OptimizerState.load(tmp_path / "x.npz")


# ------------------------------------------------------------------ errors
def test_unknown_method_names_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'x'; choose one of \['cg', 'gd'"):
        OptimizerState.start("x", np.zeros(2))


@pytest.mark.parametrize(
    ("method", "options", "name"),
    [
        ("gd", {"alpha": -0.1}, "alpha"),
        ("gd", {"alpha": 0}, "alpha"),
        ("gd", {"alpha": math.nan}, "alpha"),
        ("lbfgs", {"memory": 0}, "memory"),
        ("lbfgs", {"memory": 2.5}, "memory"),
        ("lbfgs", {"gtol": -1.0}, "gtol"),
        ("cg", {"ftol": -1e-3}, "ftol"),
        ("cg", {"c1": 0.5, "c2": 0.4}, "c2"),
        ("cg", {"c1": 0.0}, "c1"),
        ("lbfgs", {"ls_maxiter": 0}, "ls_maxiter"),
        ("lbfgs", {"alpha": 0.1}, "options"),
    ],
)
def test_bad_options_name_the_argument(method, options, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        OptimizerState.start(method, np.zeros(2), options)


@pytest.mark.parametrize("max_iter", [-1, 1.5, True])
def test_bad_max_iter(max_iter):
    state = OptimizerState.start("lbfgs", np.zeros(2))
    with pytest.raises(ValueError, match="^max_iter"):
        minimize(rosenbrock, state, max_iter=max_iter)


@pytest.mark.parametrize("theta0", [np.zeros((2, 2)), np.zeros(0), np.array([0.0, np.inf])])
def test_bad_theta0(theta0):
    with pytest.raises(ValueError, match="^theta0"):
        OptimizerState.start("lbfgs", theta0)


def test_wrong_gradient_shape():
    state = OptimizerState.start("lbfgs", np.zeros(3))
    with pytest.raises(ValueError, match="gradient has shape"):
        minimize(lambda x: (0.0, np.zeros(2)), state)


def test_non_finite_start_raises():
    state = OptimizerState.start("lbfgs", np.zeros(3))
    with pytest.raises(FloatingPointError, match="theta0"):
        minimize(lambda x: (math.nan, np.zeros(3)), state)

    def saturated(x):
        raise FloatingPointError("units saturated")

    with pytest.raises(FloatingPointError, match="units saturated"):
        minimize(saturated, state)


def test_load_rejects_inconsistent_shapes(tmp_path):
    state = minimize(rosenbrock, OptimizerState.start("lbfgs", np.zeros(4)), 3)
    arrays = state.to_arrays()
    arrays["grad"] = arrays["grad"][:3]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        OptimizerState.load(tmp_path / "bad.npz")


def test_state_is_read_only():
    state = OptimizerState.start("gd", np.zeros(2), {"alpha": 0.5})
    with pytest.raises(TypeError):
        state.options["alpha"] = 2.0
    with pytest.raises(AttributeError):
        state.iteration = 3


# ------------------------------------------------------------------ callback, stopping
def test_callback_cancels_and_run_can_continue(sae_problem):
    f, theta0 = sae_problem
    seen: list[int] = []

    def cb(state):
        seen.append(state.iteration)
        return np.bool_(state.iteration == 3)  # any true value stops

    state = minimize(f, OptimizerState.start("lbfgs", theta0), max_iter=10, callback=cb)
    assert seen == [0, 1, 2, 3]
    assert state.status == "cancelled" and "cancel" in state.message
    assert state.iteration == 3 and not state.converged and not state.failed
    state = minimize(f, state, max_iter=10, callback=cb)
    assert seen[4:] == list(range(4, 11))
    assert state.status == "max_iter" and state.iteration == 10


def test_max_iter_zero_only_evaluates(sae_problem):
    f, theta0 = sae_problem
    seen: list[OptimizerState] = []
    state = minimize(f, OptimizerState.start("cg", theta0), max_iter=0, callback=record(seen))
    assert [s.iteration for s in seen] == [0]
    assert state.status == "max_iter" and state.n_evals == 1
    assert np.array_equal(state.theta, theta0) and state.J == f(theta0)[0]


def test_ftol_stops(sae_problem):
    f, theta0 = sae_problem
    state = minimize(f, OptimizerState.start("gd", theta0, {"ftol": 1e-3}), max_iter=10_000)
    assert state.status == "converged" and "ftol" in state.message
    assert state.iteration < 10_000
    assert abs(state.J_prev - state.J) <= 1e-3 * max(abs(state.J), 1.0)


def test_converged_state_stays_converged():
    f, _, _ = quadratic()
    state = minimize(f, OptimizerState.start("lbfgs", np.zeros(10), {"gtol": 1e-8}), 100)
    assert state.converged
    again = minimize(f, state, 200)
    assert again.converged and again.iteration == state.iteration
    assert again.n_evals == state.n_evals


# ------------------------------------------------------------------ failures do not crash
@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_line_search_failure_is_reported(method):
    """A gradient pointing the wrong way: no step decreases the cost along -grad."""

    def wrong(x):
        return float(x @ x), -2.0 * x

    state = minimize(wrong, OptimizerState.start(method, np.ones(3)), max_iter=50)
    assert state.status == "line_search_failed" and state.failed
    assert "line search failed" in state.message
    assert np.array_equal(state.theta, np.ones(3)) and state.iteration == 0
    assert minimize(wrong, state, max_iter=50) is state


def test_gd_divergence_is_reported():
    def f(x):
        if np.max(np.abs(x)) > 1e6:
            raise FloatingPointError("objective: cost or gradient is not finite")
        return float(x @ x), 2.0 * x

    state = minimize(f, OptimizerState.start("gd", np.ones(2), {"alpha": 1.5}), 1000)
    assert state.status == "diverged" and "lower alpha" in state.message
    assert np.all(np.isfinite(state.theta)) and 10 < state.iteration < 100


def test_line_search_backtracks_from_errors():
    """Trial points where f raises FloatingPointError count as +inf; the search backtracks."""

    def f(x):
        if x[0] > 1.5:
            raise FloatingPointError("outside")
        return float((x[0] - 1.0) ** 2), np.array([2.0 * (x[0] - 1.0)])

    fc = CountedObjective(f)
    x = np.zeros(1)
    J, g = fc(x)
    found = wolfe_search(fc, x, J, g, np.array([10.0]), c1=1e-4, c2=0.9, maxiter=10)
    assert found is not None and found.theta[0] <= 1.5 and found.J < J
    state = minimize(f, OptimizerState.start("lbfgs", np.array([-30.0]), {"gtol": 1e-10}), 100)
    assert state.converged and abs(state.theta[0] - 1.0) < 1e-8


def test_counted_objective_cache():
    calls = []

    def f(x):
        calls.append(x.copy())
        return float(x @ x), 2.0 * x

    fc = CountedObjective(f)
    x = np.array([1.0, 2.0])
    assert fc.value(x) == 5.0
    np.testing.assert_array_equal(fc.gradient(x.copy()), [2.0, 4.0])
    assert fc.n_evals == 1
    fc.value(np.array([1.0, np.nextafter(2.0, 3.0)]))
    assert fc.n_evals == 2 == len(calls)
    J, _ = CountedObjective(lambda x: (math.inf, x))(x)
    assert J == math.inf
