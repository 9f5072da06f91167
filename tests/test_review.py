"""Fixes from the review of sae/: sparsity weight 0, clear non-finite errors."""

from __future__ import annotations

import numpy as np
import pytest

import sae
from sae.objective import finalize, fused, merge_sums, pass1, pass2, rho_hat

PASSES = ["two", "fused"]


def _data(m: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 0.95, size=(m, n))


def _dead_unit_theta(net: sae.Network) -> np.ndarray:
    """Hidden unit 0 off for every input (b1[0] = -1000): its average activation is exactly 0."""
    theta = net.init_theta(0)
    theta[net.layout[net.n_layers].start] = -1000.0
    return theta


@pytest.mark.parametrize("passes", PASSES)
def test_zero_sparsity_weight_ignores_saturated_units(passes):
    """rho set with beta = 0 (``sae train`` with {"beta": 0} keeps the default rho) is the
    network without sparsity: a unit whose average activation is 0 must not fail the run."""
    sparse0 = sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.1, beta=0.0)
    plain = sae.Network.autoencoder(6, 4, lam=1e-3)
    X = _data(9, 6)
    theta = _dead_unit_theta(sparse0)
    assert pass1(sparse0, theta, X)["a1_sum"][0] == 0.0
    J, grad = sae.cost(sparse0, theta, X, passes=passes)
    J_ref, grad_ref = sae.cost(plain, theta, X)
    assert J == pytest.approx(J_ref, rel=1e-14)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-13, atol=1e-16)


def test_zero_sparsity_weight_in_a_deep_network_with_other_sparse_layers():
    """beta = 0 on one sparse layer, beta > 0 on another: only the latter is penalised."""
    kw = {"sizes": (6, 5, 3, 5, 6), "activations": ("sigmoid",) * 4, "lam": 1e-3}
    half = sae.Network(rho=(0.1, 0.2, None, None), beta=(0.0, 3.0, 0.0, 0.0), **kw)
    only2 = sae.Network(rho=(None, 0.2, None, None), beta=(0.0, 3.0, 0.0, 0.0), **kw)
    X = _data(8, 6, seed=3)
    theta = _dead_unit_theta(half)
    s1 = pass1(half, theta, X)
    s2 = pass2(half, theta, X, rho_hat(half, s1))
    J, grad = finalize(half, theta, merge_sums(s1, s2))
    J_ref, grad_ref = sae.cost(only2, theta, X)
    assert J == pytest.approx(J_ref, rel=1e-14)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("passes", PASSES)
def test_saturation_with_positive_beta_still_fails_clearly(passes):
    net = sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.1, beta=3.0)
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \[1\] reached 0 or 1"):
        sae.cost(net, _dead_unit_theta(net), _data(9, 6), passes=passes)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("where", ["data", "theta"])
def test_non_finite_input_is_not_blamed_on_saturation(passes, where):
    net = sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.1, beta=3.0)
    X, theta = _data(9, 6), net.init_theta(0)
    if where == "data":
        X[2, 3] = np.nan
    else:
        theta[5] = np.inf
    with pytest.raises(FloatingPointError, match="non-finite values in the data") as info:
        sae.cost(net, theta, X, passes=passes)
    assert "saturated" not in str(info.value)


def test_float32_sums_accumulate_in_float64():
    """1e5 rows of float32 data: every sum is float64 and close to the float64 computation
    (a float32 accumulator over 1e5 rows would be off by ~1e-4 relative)."""
    net = sae.Network.autoencoder(8, 3, lam=1e-3, rho=0.1, beta=3.0)
    X = _data(100_000, 8, seed=5)
    theta = net.init_theta(1)
    s32, s64 = pass1(net, theta, X, dtype="float32"), pass1(net, theta, X)
    assert all(v.dtype == np.float64 for v in s32.values())
    np.testing.assert_allclose(s32["a1_sum"], s64["a1_sum"], rtol=2e-6)
    f32, f64 = fused(net, theta, X, dtype="float32"), fused(net, theta, X)
    for key in ("err", "b1", "b2", "a1_sum", "fp1"):
        assert f32[key].dtype == np.float64
        np.testing.assert_allclose(f32[key], f64[key], rtol=2e-5, atol=1e-6)
