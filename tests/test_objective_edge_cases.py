"""Fixes from the review of sae/: sparsity weight 0, clear non-finite errors, the sigmoid,
buffers reused in place without touching the caller's data, one-channel filter pictures."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

import sae
from sae.activations import ACTIVATIONS
from sae.display import tile_images
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


def test_sigmoid_matches_expit_without_warnings():
    sig = ACTIVATIONS["sigmoid"]
    z = np.concatenate([np.linspace(-800, 800, 4001), [-np.inf, np.inf, 0.0, -1e-300]])
    with np.errstate(under="ignore"):
        z32 = z.astype(np.float32)
    with np.errstate(all="raise"):
        a = sig.f(z)
        a32 = sig.f(z32)
    assert a.dtype == np.float64 and a32.dtype == np.float32
    np.testing.assert_allclose(a, expit(z), rtol=4e-16, atol=0)
    np.testing.assert_allclose(a32, expit(z32), rtol=2e-7, atol=0)
    assert a[-4] == 0.0 and a[-3] == 1.0 and a[-2] == 0.5
    assert sig.f(np.arange(3)).dtype == np.float64  # integers are promoted
    assert float(sig.f(np.array(0.0))) == 0.5


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_fprime_returns_a_new_array(name):
    act = ACTIVATIONS[name]
    a = act.f(np.linspace(-2, 2, 12).reshape(3, 4))
    before = a.copy()
    fp = act.fprime(a)
    assert fp is not a and not np.shares_memory(fp, a)
    np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("acts", [("sigmoid", "sigmoid"), ("tanh", "linear"), ("linear", "linear")])
def test_objective_leaves_the_callers_arrays_untouched(dtype, acts):
    """The backward pass scales its buffers in place: never X, Y or theta."""
    rho = None if acts[0] == "linear" else 0.1
    net = sae.Network.autoencoder(
        6, 4, lam=1e-3, rho=rho, beta=3.0, activation=acts[0], output_activation=acts[1]
    )
    X = _data(9, 6).astype(dtype)
    Y = _data(9, 6, seed=1).astype(dtype)
    theta = net.init_theta(2)
    copies = X.copy(), Y.copy(), theta.copy()
    sae.cost(net, theta, X, dtype=dtype)
    sae.cost(net, theta, X, Y=Y, dtype=dtype)
    if rho is not None:
        fused(net, theta, X, Y=Y, dtype=dtype)
    for a, b in zip((X, Y, theta), copies, strict=True):
        np.testing.assert_array_equal(a, b)


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


def test_one_channel_samples_draw_like_grayscale():
    rows = np.random.default_rng(0).uniform(1.0, 2.0, size=(5, 12))  # all positive
    gray = tile_images(rows, (3, 4))
    np.testing.assert_array_equal(tile_images(rows, (3, 4, 1)), gray)
    assert gray.max() == 255 and gray[1:4, 1:5].min() >= 128  # no mean removed
