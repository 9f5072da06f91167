"""The ReLU + L1 and TopK dictionaries against loops written from their equations, finite
differences, and themselves as chunk sums (two halves == whole, two passes == one)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae import objective as obj
from sae.dictionary import Dictionary, dead_mask, since_fired, stats
from sae.gradcheck import numerical_gradient, relative_difference
from sae.network import Network


def _theta(net: Dictionary, X: np.ndarray, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    """A generic point: random encoder, decoder columns of norms other than 1, b_dec near the
    data mean."""
    rng = np.random.default_rng(seed)
    n, h = net.d_in, net.d_sae
    W_enc = rng.normal(0, 0.5, (h, n)) * scale
    W_dec = rng.normal(0, 0.5, (n, h))
    return net.pack([W_enc, W_dec], [rng.normal(0, 0.1, h), X.mean(axis=0) + 0.01])


def _reference(net: Dictionary, theta: np.ndarray, X: np.ndarray, dead=None) -> float:
    """The cost from the equations, one example at a time (sorting instead of partition)."""
    Ws, bs = net.unpack(theta)
    W_enc, V = Ws
    b_enc, b_dec = bs
    W_dec = V / np.linalg.norm(V, axis=0) if net.unit_norm else V
    h = net.d_sae
    total = 0.0
    for x in X:
        z = W_enc @ (x - b_dec) + b_enc
        f = np.zeros(h)
        if net.kind == "relu-l1":
            f = np.maximum(z, 0)
        else:
            for j in sorted(range(h), key=lambda j: -z[j])[: net.k]:
                f[j] = max(z[j], 0.0)
        x_hat = W_dec @ f + b_dec
        total += 0.5 * np.sum((x_hat - x) ** 2)
        if net.kind == "relu-l1":
            w = np.linalg.norm(W_dec, axis=0) if net.l1_weighting == "decoder-norm" else 1.0
            total += net.l1 * np.sum(w * f)
        if dead is not None and net.uses_aux:
            ids = [j for j in range(h) if dead[j]]
            f_aux = np.zeros(len(ids))
            for a in sorted(range(len(ids)), key=lambda a: -z[ids[a]])[: net.k_aux]:
                f_aux[a] = max(z[ids[a]], 0.0)
            e_hat = W_dec[:, ids] @ f_aux
            total += net.aux_coeff * 0.5 * np.sum((x_hat + e_hat - x) ** 2)
    J = total / len(X)
    J += 0.5 * net.lam * np.sum(W_enc**2)
    if not net.unit_norm:
        J += 0.5 * net.lam * np.sum(V**2)
    return J


def _nets():
    yield "relu-l1", Dictionary.of("relu-l1", 6, 9, l1=0.05)
    yield "relu-l1-free", Dictionary.of("relu-l1", 6, 9, l1=0.05, unit_norm=False, lam=1e-3)
    yield (
        "relu-l1-decoder-norm",
        Dictionary.of("relu-l1", 6, 9, l1=0.05, l1_weighting="decoder-norm", unit_norm=False),
    )
    yield "topk", Dictionary.of("topk", 6, 9, k=3)
    yield "topk-free", Dictionary.of("topk", 6, 9, k=2, unit_norm=False, lam=1e-3)


NETS = dict(_nets())


def _X(m: int = 40, n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 1.0, (m, n))


@pytest.mark.parametrize("name", NETS)
def test_cost_matches_the_equations(name):
    net = NETS[name]
    X = _X()
    theta = _theta(net, X)
    J, _ = obj.cost(net, theta, X)
    assert J == pytest.approx(_reference(net, theta, X), rel=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_gradient_matches_finite_differences(name):
    net = NETS[name]
    X = _X()
    theta = _theta(net, X)
    _, grad = obj.cost(net, theta, X)
    num = numerical_gradient(lambda t: obj.cost(net, t, X), theta, epsilon=1e-6)
    assert relative_difference(num, grad) < 1e-7


def _aux_net_and_point():
    """TopK k=2 where latents 0 and 1 always win and 2..8 are positive but never chosen: dead,
    and visible to AuxK."""
    net = Dictionary.of("topk", 6, 9, k=2, k_aux=3, aux_coeff=0.5)
    X = _X()
    rng = np.random.default_rng(3)
    W_enc = rng.normal(0, 0.05, (9, 6))
    W_dec = rng.normal(0, 0.5, (6, 9))
    b_enc = np.r_[20.0, 19.0, rng.uniform(1.0, 3.0, 7)]
    return net, X, net.pack([W_enc, W_dec], [b_enc, X.mean(axis=0)])


def test_auxk_dead_latents_come_from_pass_one_and_enter_the_cost():
    net, X, theta = _aux_net_and_point()
    s1 = obj.pass1(net, theta, X)
    np.testing.assert_array_equal(s1["fired1"], [40, 40] + [0] * 7)
    dead = dead_mask(net, stats(net, s1))
    np.testing.assert_array_equal(dead, [False, False] + [True] * 7)
    J, grad = obj.cost(net, theta, X)
    assert J == pytest.approx(_reference(net, theta, X, dead), rel=1e-12)
    J_plain = _reference(net, theta, X, None)
    assert J > J_plain * 1.01  # the aux term is really there
    num = numerical_gradient(lambda t: obj.cost(net, t, X), theta, epsilon=1e-6)
    assert relative_difference(num, grad) < 1e-7
    # the dead latents' encoder rows get a gradient only through AuxK
    no_aux = Dictionary.of("topk", 6, 9, k=2)
    _, g0 = obj.cost(no_aux, theta, X)
    rows = net.unpack(grad)[0][0][2:]
    assert np.abs(rows).max() > 0
    assert np.abs(no_aux.unpack(g0)[0][0][2:]).max() == 0


def test_auxk_needs_two_passes():
    net, X, theta = _aux_net_and_point()
    with pytest.raises(ValueError, match="passes"):
        obj.cost(net, theta, X, passes="fused")


@pytest.mark.parametrize("name", NETS)
def test_chunks_add_up_and_one_pass_equals_two(name):
    net = NETS[name]
    X = _X(50)
    theta = _theta(net, X)
    halves = [obj.pass2(net, theta, part, {}) for part in (X[:20], X[20:])]
    J_chunks, g_chunks = obj.finalize(net, theta, obj.add_sums(*halves))
    J, g = obj.cost(net, theta, X)
    assert J_chunks == pytest.approx(J, rel=1e-13)
    np.testing.assert_allclose(g_chunks, g, rtol=1e-11, atol=1e-13)
    J1, g1 = obj.cost(net, theta, X, passes="fused")
    assert J1 == J and np.array_equal(g1, g)


def test_topk_keeps_exactly_k_latents():
    net = Dictionary.of("topk", 6, 9, k=3)
    X = _X()
    f = obj.forward(net, _theta(net, X), X, upto=1)[1]
    assert np.all(np.count_nonzero(f, axis=1) <= 3)
    assert np.count_nonzero(f, axis=1).mean() > 2  # most rows have 3 positive winners


def test_float32_is_close_to_float64():
    net = NETS["topk"]
    X = _X()
    theta = _theta(net, X)
    J64, g64 = obj.cost(net, theta, X)
    J32, g32 = obj.cost(net, theta, X, dtype="float32")
    assert J32 == pytest.approx(J64, rel=1e-5)
    assert relative_difference(g32, g64) < 1e-4


def test_unit_norm_gradient_is_orthogonal_to_the_columns_and_project_normalises():
    net = NETS["relu-l1"]
    X = _X()
    theta = net.project(_theta(net, X))
    W_dec = net.unpack(theta)[0][1]
    np.testing.assert_allclose(np.linalg.norm(W_dec, axis=0), 1.0, rtol=1e-15)
    _, grad = obj.cost(net, theta, X)
    g_dec = net.unpack(grad)[0][1]
    np.testing.assert_allclose(np.einsum("ij,ij->j", W_dec, g_dec), 0.0, atol=1e-14)
    # scaling V does not change the function
    Ws, bs = net.unpack(theta)
    scaled = net.pack([Ws[0], 3.0 * Ws[1]], bs)
    assert obj.cost(net, scaled, X)[0] == pytest.approx(obj.cost(net, theta, X)[0], rel=1e-14)


def test_init_is_tied_unit_norm_and_centred():
    net = NETS["topk"]
    mean = np.arange(6.0)
    theta = net.init_theta(5, mean=mean)
    (W_enc, W_dec), (b_enc, b_dec) = net.unpack(theta)
    np.testing.assert_allclose(np.linalg.norm(W_dec, axis=0), 1.0, rtol=1e-15)
    np.testing.assert_array_equal(W_enc, W_dec.T)
    np.testing.assert_array_equal(b_dec, mean)
    assert not b_enc.any()
    untied = net.unpack(net.init_theta(5, tied=False))[0][0]
    assert not np.array_equal(untied, W_dec.T)


def test_since_fired_counts_examples_and_resets():
    net = Dictionary.of("topk", 4, 5, k=1, k_aux=2, dead_after=30)
    s = since_fired(net, {"count": 10.0, "fired1": np.array([1.0, 0, 0, 2, 0])}, None)
    np.testing.assert_array_equal(s[1], [0, 10, 10, 0, 10])
    s = since_fired(net, {"count": 25.0, "fired1": np.array([0.0, 3, 0, 0, 0])}, s)
    np.testing.assert_array_equal(s[1], [25, 0, 35, 25, 35])
    np.testing.assert_array_equal(dead_mask(net, s), [False, False, True, False, True])
    full = stats(net, {"count": 10.0, "fired1": np.array([1.0, 0, 0, 2, 0])})
    assert full[1][1] == math.inf and full[1][0] == 0


def test_round_trip_through_a_dict():
    for net in NETS.values():
        back = Network.from_dict(net.to_dict())
        assert back == net and isinstance(back, Dictionary)
    aux = Dictionary.of("topk", 4, 5, k=2, k_aux=3, dead_after=100)
    assert Network.from_dict(aux.to_dict()) == aux


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(kind="topk", k=0), "k"),
        (dict(kind="topk", k=10), "k"),
        (dict(kind="topk"), "k"),
        (dict(kind="topk", k=2, k_aux=99), "k_aux"),
        (dict(kind="relu-l1", l1=-1.0), "l1"),
        (dict(kind="relu-l1", k=3), "k"),
        (dict(kind="relu-l1", l1_weighting="sideways"), "l1_weighting"),
        (dict(kind="nope"), "kind"),
        (dict(kind="topk", k=2, aux_coeff=float("nan")), "aux_coeff"),
    ],
)
def test_bad_options_name_their_field(kwargs, field):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=f"^{field}:"):
        Dictionary.of(kind, 6, 9, **kwargs)


@pytest.mark.parametrize("name", [*NETS, "topk-auxk"])
def test_row_blocks_add_up_to_the_whole_chunk(name, monkeypatch):
    """Blocks of 7 rows and one block of all 40 give the same sums to 1e-12 in float64
    (pass 1's firing counts and pass 2, with AuxK's dead latents too)."""
    import sae.blocks

    if name == "topk-auxk":
        net, X, theta = _aux_net_and_point()
    else:
        net, X = NETS[name], _X()
        theta = _theta(net, X)

    def sums(block):
        monkeypatch.setattr(sae.blocks, "BLOCK_ROWS", block)
        s1 = obj.pass1(net, theta, X)
        return {**s1, **obj.pass2(net, theta, X, obj.rho_hat(net, s1))}

    whole, blocked = sums(1000), sums(7)
    assert whole.keys() == blocked.keys()
    for k in whole:
        assert np.allclose(blocked[k], whole[k], rtol=1e-12, atol=1e-12 * np.abs(whole[k]).max()), k
    if name == "topk-auxk":
        assert float(whole["aux"]) > 0  # the dead latents took part
