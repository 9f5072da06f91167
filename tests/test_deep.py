"""Deep autoencoders: the stacked objective's gradient, the plan's networks and initialisations,
greedy pretraining in memory, and bad specs."""

from __future__ import annotations

import numpy as np
import pytest

import sae
from sae.deep import (
    DeepPlan,
    encode,
    pca_reconstruction_error,
    pretrain_and_finetune,
    reconstruct,
    stage_data,
    validate_sizes,
)
from sae.gradcheck import check_gradient


def _data(m: int, n: int, seed: int = 0, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size=(m, n))


# ------------------------------------------------------------------ gradient of the stack
HIDDEN = {1: (5,), 2: (5, 3), 3: (6, 4, 3)}


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize(
    "activation,code,output",
    [
        ("sigmoid", None, None),
        ("tanh", None, None),
        ("sigmoid", "linear", None),
        ("tanh", "linear", "linear"),
        ("linear", None, None),
    ],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_of_unrolled_network(depth, activation, code, output, sparse):
    """Central differences agree with backprop through the whole unrolled stack (2, 4 and 6
    layers), for every activation, with and without sparsity on every bounded encoder layer."""
    if sparse and (activation == "linear" or (depth == 1 and code == "linear")):
        pytest.skip("linear units have no sparsity target")
    plan = DeepPlan(
        7,
        HIDDEN[depth],
        activation=activation,
        code_activation=code,
        output_activation=output,
        lam=1e-3,
        rho=0.2 if sparse else None,
        beta=0.5,
        finetune_sparse=sparse,
    )
    net = plan.network()
    assert net.n_layers == 2 * depth
    if sparse:
        assert net.sparse_layers  # at least one sparse layer is checked
    X = _data(10, 7, seed=depth) * (2 if (output or activation) != "sigmoid" else 1)
    theta = net.init_theta(seed=depth) + 0.01
    for passes in ("two",) + (("fused",) if net.sparse_layers in ((), (1,)) else ()):
        diff = check_gradient(
            lambda t, p=passes: sae.cost(net, t, X, passes=p), theta, epsilon=1e-5
        )
        assert diff < 1e-9, (passes, diff)


@pytest.mark.parametrize("pretrain", ["previous", "input"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_of_stage_objective(pretrain, k):
    """Each stage's objective (input = lower codes, target = codes or x) has an exact gradient."""
    plan = DeepPlan(
        7, (6, 4, 3), code_activation="linear", lam=1e-3, rho=0.1, beta=3.0, pretrain=pretrain
    )
    X = _data(12, 7, seed=k)
    rng = np.random.default_rng(1)
    thetas = [plan.stage_network(j).init_theta(j) + rng.normal(0, 0.1) for j in range(1, k)]
    A, Y = stage_data(plan, thetas, k, X)
    sn = plan.stage_network(k)
    assert A.shape == (12, plan.encoder_sizes[k - 1])
    if pretrain == "input" and k > 1:
        assert Y is X and sn.sizes[-1] == 7
    else:
        assert Y is None and sn.sizes[-1] == sn.sizes[0]
    diff = check_gradient(lambda t: sae.cost(sn, t, A, Y), sn.init_theta(k) + 0.01, epsilon=1e-5)
    assert diff < 1e-9


# ------------------------------------------------------------------ architecture
def test_unrolled_network_layout():
    plan = DeepPlan(784, (1000, 500, 250, 30), code_activation="linear", rho=0.1, beta=3.0)
    net = plan.network()
    assert net.sizes == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert net.activations == ("sigmoid",) * 3 + ("linear",) + ("sigmoid",) * 4
    assert net.sparse_layers == ()  # no sparsity in fine-tuning by default
    assert plan.rho == (0.1, 0.1, 0.1, None)  # no target for linear code units
    s2 = plan.stage_network(2)
    assert s2.sizes == (1000, 500, 1000) and s2.sparse_layers == (1,)
    s4 = plan.stage_network(4)
    assert s4.sizes == (250, 30, 250) and s4.activations == ("linear", "sigmoid")
    assert s4.sparse_layers == ()
    s4x = DeepPlan(784, (1000, 500, 250, 30), pretrain="input", output_activation="linear")
    assert s4x.stage_network(4).sizes == (250, 30, 784)
    assert s4x.stage_network(4).activations == ("sigmoid", "linear")
    sparse_ft = DeepPlan(784, (100, 30), rho=0.1, beta=3.0, finetune_sparse=(True, False))
    assert sparse_ft.network().sparse_layers == (1,)


# ------------------------------------------------------------------ initialisations
def _trained_like(plan: DeepPlan, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=plan.stage_network(k).n_params) for k in range(1, plan.n_stages + 1)]


@pytest.mark.parametrize("pretrain", ["previous", "input"])
def test_transposed_init_is_the_transpose(pretrain):
    plan = DeepPlan(9, (7, 5, 3), pretrain=pretrain, decoder_init="transpose")
    stages = _trained_like(plan)
    net = plan.network()
    Ws, bs = net.unpack(plan.assemble(stages))
    K = plan.K
    for k in range(1, K + 1):
        (W1, W2), (b1, b2) = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[k - 1], W1)
        np.testing.assert_array_equal(bs[k - 1], b1)
        np.testing.assert_array_equal(Ws[2 * K - k], W1.T)  # W_dec = W_enc^T exactly
        if pretrain == "previous" or k == 1:
            np.testing.assert_array_equal(bs[2 * K - k], b2)
        else:
            np.testing.assert_array_equal(bs[2 * K - k], 0.0)


def test_pretrained_init_uses_stage_decoders():
    plan = DeepPlan(9, (7, 5, 3), pretrain="previous", decoder_init="pretrained")
    stages = _trained_like(plan, 1)
    Ws, bs = plan.network().unpack(plan.assemble(stages))
    for k in range(1, 4):
        (W1, W2), (b1, b2) = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[k - 1], W1)
        np.testing.assert_array_equal(Ws[6 - k], W2)
        np.testing.assert_array_equal(bs[6 - k], b2)
    # "input" target: stage 1's decoder is the output layer; inner decoders are transposes
    plan = DeepPlan(9, (7, 5, 3), pretrain="input", decoder_init="pretrained")
    stages = _trained_like(plan, 2)
    Ws, bs = plan.network().unpack(plan.assemble(stages))
    (W1, W2), (b1, b2) = plan.stage_network(1).unpack(stages[0])
    np.testing.assert_array_equal(Ws[5], W2)
    np.testing.assert_array_equal(bs[5], b2)
    for k in (2, 3):
        (W1, _), _ = plan.stage_network(k).unpack(stages[k - 1])
        np.testing.assert_array_equal(Ws[6 - k], W1.T)
        np.testing.assert_array_equal(bs[6 - k], 0.0)


def test_no_pretraining_is_random_init():
    plan = DeepPlan(9, (7, 3), pretrain="none")
    assert plan.n_stages == 0
    np.testing.assert_array_equal(plan.assemble([], seed=3), plan.network().init_theta(3))
    tied = DeepPlan(9, (7, 3), pretrain="none", decoder_init="transpose")
    Ws, _ = tied.network().unpack(tied.assemble([], seed=3))
    np.testing.assert_array_equal(Ws[3], Ws[0].T)
    np.testing.assert_array_equal(Ws[2], Ws[1].T)


# ------------------------------------------------------------------ pretraining in memory
@pytest.mark.parametrize("pretrain", ["previous", "input"])
def test_each_pretraining_target_reduces_its_stage_cost(pretrain):
    X = _data(60, 16, seed=5)
    plan = DeepPlan(
        16, (10, 6, 3), code_activation="linear", lam=1e-4, rho=0.1, beta=0.5, pretrain=pretrain
    )
    res = pretrain_and_finetune(plan, X, max_iter=30, finetune_iter=30)
    assert len(res.stage_thetas) == 3
    for k in range(1, 4):
        hist = res.histories[f"pretrain {k}/3"]
        assert hist[-1] < 0.9 * hist[0], (k, hist[0], hist[-1])
        # the recorded final cost is the stage objective at the returned parameters
        A, Y = stage_data(plan, res.stage_thetas, k, X)
        J, _ = sae.cost(plan.stage_network(k), res.stage_thetas[k - 1], A, Y)
        assert J == pytest.approx(hist[-1], rel=1e-12)
    ft = res.histories["finetune"]
    assert ft[-1] < ft[0]
    assert sae.cost(res.net, res.start_theta, X)[0] == pytest.approx(ft[0], rel=1e-12)


def test_encode_and_reconstruct_shapes():
    plan = DeepPlan(9, (7, 5, 3), code_activation="linear")
    net = plan.network()
    theta = net.init_theta(0)
    X = _data(4, 9)
    assert encode(net, theta, X).shape == (4, 3)
    assert encode(net, theta, X, layer=1).shape == (4, 7)
    assert reconstruct(net, theta, X).shape == (4, 9)
    one = sae.Network.autoencoder(9, 4)
    assert encode(one, one.init_theta(0), X).shape == (4, 4)
    with pytest.raises(ValueError, match="layer"):
        encode(net, theta, X, layer=7)


def test_pca_baseline_matches_projection():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    err = pca_reconstruction_error(X, X, 6)
    assert np.all(err < 1e-9)  # all components: exact
    err2 = pca_reconstruction_error(X, X, 2)
    assert err2.mean() > 0


# ------------------------------------------------------------------ bad specs
@pytest.mark.parametrize(
    "n_visible,hidden,stages,field",
    [
        (10, [], None, "hidden"),
        (10, [5, 0], None, "hidden"),
        (10, [5, -3], None, "hidden"),
        (10, [20, 12], None, "hidden"),  # code layer larger than the input
        (10, [5, 3], 3, "stages"),
        (10, [5, 3], -1, "stages"),
    ],
)
def test_bad_sizes_are_named(n_visible, hidden, stages, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        validate_sizes(n_visible, hidden, stages)
    with pytest.raises(ValueError, match=f"^{field}:"):
        DeepPlan(n_visible, tuple(hidden), stages=stages)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="^pretrain:"):
        DeepPlan(10, (5, 3), pretrain="both")
    with pytest.raises(ValueError, match="^decoder_init:"):
        DeepPlan(10, (5, 3), decoder_init="mirror")
    with pytest.raises(ValueError, match="^rho:"):
        DeepPlan(10, (5, 3), code_activation="linear", rho=(0.1, 0.1))
    with pytest.raises(ValueError, match="activation"):
        DeepPlan(10, (5, 3), activation="relu")
    # an overcomplete first layer is fine; only the code must not exceed the input
    DeepPlan(10, (20, 5))
