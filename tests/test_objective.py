"""The sparse autoencoder objective against the notes' equations, finite differences, and
itself in its three forms (two-pass, fused, in-memory)."""

from __future__ import annotations

import numpy as np
import pytest

import sae
from sae.gradcheck import check_gradient, numerical_gradient, relative_difference
from sae.objective import add_sums, finalize, fused, merge_sums, pass1, pass2, rho_hat
from tests.reference import loop_cost


def _data(m: int, n: int, seed: int = 0, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size=(m, n))


def _inputs(net: sae.Network, m: int, seed: int) -> np.ndarray:
    """Data in the range of the network's output units (tanh outputs: [-0.9, 0.9])."""
    if net.activations[-1] == "tanh":
        return _data(m, net.sizes[0], seed, -0.9, 0.9)
    return _data(m, net.sizes[0], seed)


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _nets():
    """Networks covering every activation, with and without sparsity, 1 and 3 hidden layers."""
    yield "sae-sigmoid", sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.1, beta=3.0)
    yield "sae-sigmoid-nosparse", sae.Network.autoencoder(6, 4, lam=1e-3)
    yield "sae-tanh", sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.1, beta=3.0, activation="tanh")
    yield (
        "sae-linear-out",
        sae.Network.autoencoder(6, 4, lam=1e-3, rho=0.05, beta=3.0, output_activation="linear"),
    )
    yield "sae-linear", sae.Network.autoencoder(6, 4, lam=1e-3, activation="linear")
    for act in ("sigmoid", "tanh"):
        yield (
            f"deep3-{act}",
            sae.Network(
                sizes=(6, 5, 3, 5, 6),
                activations=(act,) * 4,
                lam=1e-3,
                rho=(0.1, 0.2, 0.15, None),
                beta=(3.0, 3.0, 3.0, 0.0),
            ),
        )
    yield (
        "deep3-linear-code",
        sae.Network(
            sizes=(6, 5, 3, 2, 3, 5, 6),
            activations=("sigmoid", "tanh", "linear", "tanh", "sigmoid", "linear"),
            lam=1e-3,
            rho=(0.1, None, None, 0.3, None, None),
            beta=(3.0, 0.0, 0.0, 1.0, 0.0, 0.0),
        ),
    )


NETS = dict(_nets())


@pytest.mark.parametrize("name", list(NETS))
def test_cost_and_gradient_match_per_example_loop(name):
    net = NETS[name]
    X = _inputs(net, 7, seed=1)
    theta = net.init_theta(seed=3)
    # non-zero biases so the bias paths are exercised
    theta[net.layout[net.n_layers].start :] = np.random.default_rng(4).normal(
        0, 0.1, net.n_params - net.layout[net.n_layers].start
    )
    J, grad = sae.cost(net, theta, X)
    Ws, bs = net.unpack(theta)
    J_ref, dW, db = loop_cost(net.sizes, net.activations, Ws, bs, X, X, net.lam, net.rho, net.beta)
    assert abs(J - J_ref) <= 1e-10 * abs(J_ref)
    assert _rel(grad, net.pack(dW, db)) <= 1e-10


@pytest.mark.parametrize("name", list(NETS))
def test_gradient_check_central_differences(name):
    net = NETS[name]
    X = _inputs(net, 10, seed=2)
    theta = net.init_theta(seed=5)
    diff = check_gradient(lambda t: sae.cost(net, t, X), theta)
    assert diff < 1e-9, diff


def test_sparse_autoencoder_cost_is_the_ufldl_function():
    rng = np.random.default_rng(0)
    visible, hidden, m = 8, 5, 12
    X = rng.random((m, visible))
    net = sae.Network.autoencoder(visible, hidden, lam=1e-4, rho=0.01, beta=3.0)
    theta = net.init_theta(1)
    J, grad = sae.sparse_autoencoder_cost(theta, X, visible, hidden, 1e-4, 0.01, 3.0)
    # UFLDL order: W1 (h x n), W2 (n x h), b1 (h), b2 (n), row-major
    W1 = theta[: hidden * visible].reshape(hidden, visible)
    W2 = theta[hidden * visible : 2 * hidden * visible].reshape(visible, hidden)
    b1 = theta[2 * hidden * visible : 2 * hidden * visible + hidden]
    b2 = theta[2 * hidden * visible + hidden :]
    Ws, bs = net.unpack(theta)
    assert np.array_equal(Ws[0], W1) and np.array_equal(Ws[1], W2)
    assert np.array_equal(bs[0], b1) and np.array_equal(bs[1], b2)
    J_ref, dW, db = loop_cost(
        net.sizes, net.activations, [W1, W2], [b1, b2], X, X, 1e-4, [0.01, None], [3.0, 0.0]
    )
    assert abs(J - J_ref) <= 1e-10 * J_ref
    ref = np.concatenate([dW[0].ravel(), dW[1].ravel(), db[0], db[1]])
    assert _rel(grad, ref) <= 1e-10


def test_initialisation_follows_ufldl():
    net = sae.Network.autoencoder(64, 25)
    theta = net.init_theta(seed=0)
    Ws, bs = net.unpack(theta)
    r = np.sqrt(6.0 / (64 + 25 + 1))
    for W in Ws:
        assert np.all(np.abs(W) <= r) and np.abs(W).max() > 0.9 * r
    assert all(np.all(b == 0) for b in bs)
    assert np.array_equal(theta, net.init_theta(seed=0))
    assert not np.array_equal(theta, net.init_theta(seed=1))


@pytest.mark.parametrize("name", ["sae-sigmoid", "sae-tanh", "sae-linear-out", "deep3-linear-code"])
@pytest.mark.parametrize("n_chunks", [1, 3, 7])
def test_two_pass_fused_and_in_memory_agree(name, n_chunks):
    net = NETS[name]
    X = _inputs(net, 50, seed=6)
    theta = net.init_theta(seed=7)
    J, grad = sae.cost(net, theta, X)
    chunks = np.array_split(X, n_chunks)
    # two passes over chunks, summed in chunk order
    s1 = pass1(net, theta, chunks[0])
    for c in chunks[1:]:
        s1 = add_sums(s1, pass1(net, theta, c))
    rh = rho_hat(net, s1)
    s2 = pass2(net, theta, chunks[0], rh)
    for c in chunks[1:]:
        s2 = add_sums(s2, pass2(net, theta, c, rh))
    J2, g2 = finalize(net, theta, merge_sums(s1, s2))
    assert abs(J2 - J) <= 1e-12 * abs(J) and _rel(g2, grad) <= 1e-12
    if any(l != 1 for l in net.sparse_layers):
        with pytest.raises(ValueError, match="passes"):
            fused(net, theta, X)
        return
    sf = fused(net, theta, chunks[0])
    for c in chunks[1:]:
        sf = add_sums(sf, fused(net, theta, c))
    Jf, gf = finalize(net, theta, sf)
    assert abs(Jf - J) <= 1e-12 * abs(J) and _rel(gf, grad) <= 1e-12
    Jm, gm = sae.cost(net, theta, X, passes="fused")
    assert abs(Jm - J) <= 1e-12 * abs(J) and _rel(gm, grad) <= 1e-12


def test_float32_computation_is_close_and_sums_are_float64():
    net = NETS["sae-sigmoid"]
    X = _data(200, 6, seed=8)
    theta = net.init_theta(9)
    J, g = sae.cost(net, theta, X)
    J32, g32 = sae.cost(net, theta, X, dtype="float32")
    assert g32.dtype == np.float64
    assert abs(J32 - J) <= 1e-5 * J and _rel(g32, g) <= 1e-4
    assert all(v.dtype == np.float64 for v in fused(net, theta, X, dtype="float32").values())


def test_targets_other_than_inputs():
    """A stage whose decoder reconstructs another target (deep pretraining, target x)."""
    net = sae.Network.autoencoder(4, 3, lam=1e-3, rho=0.1, beta=3.0, output_size=6)
    X, Y = _data(9, 4, seed=10), _data(9, 6, seed=11)
    theta = net.init_theta(2)
    J, grad = sae.cost(net, theta, X, Y=Y)
    Ws, bs = net.unpack(theta)
    J_ref, dW, db = loop_cost(net.sizes, net.activations, Ws, bs, X, Y, net.lam, net.rho, net.beta)
    assert abs(J - J_ref) <= 1e-10 * J_ref and _rel(grad, net.pack(dW, db)) <= 1e-10
    assert check_gradient(lambda t: sae.cost(net, t, X, Y=Y), theta) < 1e-9
    with pytest.raises(ValueError, match="Y"):
        sae.cost(net, theta, X)


def test_numerical_gradient_of_a_known_function():
    A = np.array([[3.0, 1.0], [1.0, 2.0]])

    def f(t):
        return 0.5 * t @ A @ t + np.sin(t[0])

    t = np.array([0.3, -1.2])
    num = numerical_gradient(f, t)
    exact = A @ t + np.array([np.cos(0.3), 0.0])
    assert relative_difference(num, exact) < 1e-9
    # and a wrong gradient is caught
    assert relative_difference(num, exact * 1.01) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(rho=0.0, beta=3.0), "rho"),
        (dict(rho=1.0, beta=3.0), "rho"),
        (dict(rho=1.5, beta=3.0), "rho"),
        (dict(lam=-1e-3), "lam"),
        (dict(rho=0.1, beta=-1.0), "beta"),
        (dict(activation="relu6"), "activation"),
        (dict(rho=0.1, beta=3.0, activation="linear"), "rho"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sae.Network.autoencoder(8, 4, **kwargs)


def test_shape_mismatches_name_the_argument():
    net = sae.Network.autoencoder(8, 4, rho=0.1, beta=3.0)
    theta = net.init_theta(0)
    with pytest.raises(ValueError, match="X"):
        sae.cost(net, theta, np.zeros((5, 7)))
    with pytest.raises(ValueError, match="theta"):
        sae.cost(net, theta[:-1], np.zeros((5, 8)))
    with pytest.raises(ValueError, match="sizes"):
        sae.Network(sizes=(8, 0, 8), activations=("sigmoid", "sigmoid"))
    with pytest.raises(ValueError, match="activation"):
        sae.sparse_autoencoder_cost(theta, np.zeros((5, 8)), 8, 4, 1e-4, 0.1, 3.0) and None
        sae.Network(sizes=(8, 4, 8), activations=("sigmoid", "softsign"))
    with pytest.raises(ValueError, match="passes"):
        sae.cost(net, theta, np.zeros((5, 8)), passes="three")


def test_saturated_units_fail_with_a_clear_message():
    net = sae.Network.autoencoder(3, 2, rho=0.1, beta=3.0)
    theta = net.init_theta(0)
    theta[net.layout[2].start : net.layout[2].stop] = 1e4  # b1: hidden units saturate at 1
    with pytest.raises(FloatingPointError, match="saturated"):
        sae.cost(net, theta, _data(4, 3))


def test_network_round_trips_through_dict():
    net = NETS["deep3-linear-code"]
    assert sae.Network.from_dict(net.to_dict()) == net


@pytest.mark.parametrize("name", [n for n, _ in _nets()])
def test_row_blocks_add_up_to_the_whole_chunk(name, monkeypatch):
    """The kernels process a chunk in row blocks (``sae.blocks.BLOCK_ROWS``): blocks of 7 rows
    and one block of all 50 give the same sums to 1e-12 in float64 (pass 1, pass 2 and the
    fused pass), and the blocked cost still matches the notes' equations."""
    import sae.blocks

    net = dict(_nets())[name]
    X = _inputs(net, 50, seed=4)
    theta = net.init_theta(2)

    def sums(block):
        monkeypatch.setattr(sae.blocks, "BLOCK_ROWS", block)
        s1 = pass1(net, theta, X)
        out = {"p1": s1, "p2": pass2(net, theta, X, rho_hat(net, s1))}
        if all(l == 1 for l in net.sparse_layers):
            out["fused"] = fused(net, theta, X)
        return out

    whole, blocked = sums(1000), sums(7)
    for part in whole:
        assert whole[part].keys() == blocked[part].keys()
        for k in whole[part]:
            assert _rel(blocked[part][k], whole[part][k]) < 1e-12, (part, k)
    monkeypatch.setattr(sae.blocks, "BLOCK_ROWS", 7)
    J, _ = finalize(net, theta, merge_sums(blocked["p1"], blocked["p2"]))
    Ws, bs = net.unpack(theta)
    J_ref = loop_cost(net.sizes, net.activations, Ws, bs, X, X, net.lam, net.rho, net.beta)[0]
    assert J == pytest.approx(J_ref, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", [n for n, net in NETS.items() if net.sparse_layers])
def test_pass_2_from_what_pass_1_kept_has_the_same_bits(name, dtype, monkeypatch):
    """Pass 2 given the activations pass 1 kept (the minibatch engine and ``cost`` skip those
    products) gives bitwise the sums of pass 2 computing them, in blocks of 7 rows too;
    blocks that do not match the chunk's are refused."""
    import sae.blocks

    net = NETS[name]
    X = _inputs(net, 50, seed=5)
    theta = net.init_theta(3)
    for block in (1000, 7):
        monkeypatch.setattr(sae.blocks, "BLOCK_ROWS", block)
        keep: list = []
        s1 = pass1(net, theta, X, dtype=dtype, keep=keep)
        assert len(keep) == -(-50 // block)
        assert len(keep[0]) == max(net.sparse_layers)
        r = rho_hat(net, s1)
        full = pass2(net, theta, X, r, dtype=dtype)
        given = pass2(net, theta, X, r, dtype=dtype, given=keep)
        assert full.keys() == given.keys()
        for k in full:
            assert np.array_equal(full[k], given[k]), k
    with pytest.raises(ValueError, match="^given: "):
        pass2(net, theta, X, r, dtype=dtype, given=keep[:-1])
    keep[0][0] = keep[0][0] + 0.5  # what pass 2 computes does come from what it is given
    moved = pass2(net, theta, X, r, dtype=dtype, given=keep)
    assert not np.array_equal(moved["W1"], full["W1"])
