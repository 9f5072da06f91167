"""Deep autoencoders: greedy layer-wise pretraining, then fine-tuning of the unrolled stack.

A deep autoencoder with encoder sizes ``n_0 -> h_1 -> ... -> h_K`` (``h_K`` is the code) is
unrolled into the ``L = 2K`` layer network

    n_0 -> h_1 -> ... -> h_K -> h_{K-1} -> ... -> h_1 -> n_0

whose layer ``k <= K`` is encoder ``k`` and whose layer ``2K - k + 1`` is the decoder that
mirrors it (it maps ``h_k -> h_{k-1}``). Activations: ``activation`` on every hidden layer,
``code_activation`` on layer K (e.g. a linear code, as in Hinton and Salakhutdinov 2006) and
``output_activation`` on the reconstruction layer L.

Pretraining (:class:`DeepArchitecture`, stage ``k = 1..K``) trains the sparse autoencoder

    stage k:  h_{k-1} -> h_k -> (h_{k-1}  if pretrain == "previous"
                                 n_0      if pretrain == "input")

whose input is the codes ``a_{k-1}`` of the frozen lower encoders ``1..k-1`` (``a_0 = x``) and
whose target is those same codes (classic greedy stacking) or the original input ``x`` (each
stage reconstructs x from its own code). The hidden units of stage k are those of encoder layer
k (same activation, the sparsity target ``rho`` where the units have a bounded range); the
output units are those of the layer being reconstructed.

Fine-tuning starts from :meth:`DeepArchitecture.assemble` and trains the unrolled network end
to end on the reconstruction of x. What the decoder initialisations mean:

``decoder_init="pretrained"``
    ``pretrain="previous"``: decoder layer ``2K - k + 1`` is stage k's decoder ``(W2, b2)``,
    which was trained to map ``h_k -> h_{k-1}`` - exactly the mirror layer's job.
    ``pretrain="input"``: every stage decoder maps its code straight to x; only stage 1's
    ``(W2, b2)`` (``h_1 -> n_0``) has the shape and the meaning of a layer of the unrolled
    decoder, and it becomes the output layer L. The inner decoder layers ``h_k -> h_{k-1}``
    (``k >= 2``) have no pretrained counterpart and fall back to the transpose rule below with
    zero biases.
``decoder_init="transpose"``
    ``W_{2K-k+1} = W_k^T`` (tied-weight start, as when unrolling stacked RBMs). Biases: the
    pretrained stage decoder bias ``b2`` where it belongs to that layer (every layer for
    ``"previous"``, the output layer for ``"input"``), zeros elsewhere.
``pretrain="none"``
    No pretraining: the unrolled network starts from :meth:`Network.init_theta` (random
    weights, zero biases), for comparison; with ``decoder_init="transpose"`` the decoder
    weights are then replaced by the transposes of the random encoder weights.

Everything here is pure numpy; :func:`pretrain_and_finetune` is the in-memory reference of what
the distributed job loop (``worker.job``) computes chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sae.activations import get_activation
from sae.network import Network
from sae.objective import cost, forward

Pretrain = Literal["previous", "input", "none"]
DecoderInit = Literal["pretrained", "transpose"]
#: What a pretraining stage reconstructs: its own inputs (the previous layer's activations;
#: x for stage 1) or the original input x. The same words as the spec's ``pretrain``.
StageTarget = Literal["previous", "input"]

PRETRAIN_CHOICES = ("previous", "input", "none")
DECODER_INIT_CHOICES = ("pretrained", "transpose")


def validate_sizes(n_visible: int, hidden: Sequence[int], stages: int | None = None) -> None:
    """Check the sizes of a deep autoencoder; raise ValueError naming the field.

    Parameters
    ----------
    n_visible : int
        Input size ``n_0`` (features of the dataset).
    hidden : sequence of int
        Encoder sizes ``h_1..h_K``; the last is the code.
    stages : int, optional
        Number of pretraining stages requested (default K).
    """
    hidden = list(hidden) if not isinstance(hidden, int) else [hidden]
    if not hidden:
        raise ValueError("hidden: give at least one layer size (e.g. --hidden 1000,500,250,30)")
    for h in hidden:
        if isinstance(h, bool) or not isinstance(h, int | np.integer) or h < 1:
            raise ValueError(f"hidden: layer sizes must be positive integers, got {hidden}")
    if isinstance(n_visible, bool) or not isinstance(n_visible, int | np.integer) or n_visible < 1:
        raise ValueError(f"dataset: the input size must be a positive integer, got {n_visible!r}")
    if len(hidden) > 1 and hidden[-1] > n_visible:
        raise ValueError(
            f"hidden: the code layer ({hidden[-1]} units) is larger than the input "
            f"({n_visible} features); a deep autoencoder's code must not exceed its input"
        )
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int | np.integer) or stages < 0:
            raise ValueError(f"stages: must be an integer >= 0, got {stages!r}")
        if stages > len(hidden):
            raise ValueError(
                f"stages: {stages} pretraining stages requested but the encoder has only "
                f"{len(hidden)} layers ({hidden}); at most one stage per layer"
            )


@dataclass(frozen=True)
class DeepArchitecture:
    """The architecture of a deep autoencoder and how to pretrain and initialise it.

    Parameters
    ----------
    n_visible : int
        Input size ``n_0``.
    hidden : tuple of int
        Encoder sizes ``(h_1, ..., h_K)``; ``h_K`` is the code.
    activation : str
        Activation of the hidden layers.
    code_activation : str, optional
        Activation of the code layer K (default: ``activation``); ``"linear"`` for a linear
        code.
    output_activation : str, optional
        Activation of the reconstruction layer (default: ``activation``).
    lam : float
        Weight decay of every stage and of fine-tuning.
    rho : float or sequence of (float or None), optional
        Sparsity target of the hidden units of each pretraining stage; one float applies to
        every encoder layer whose units have a bounded range (linear codes get none).
    beta : float
        Sparsity weight.
    pretrain : {"previous", "input", "none"}
        Target of a stage's decoder: the stage's input (the previous layer's activations), the
        original input x, or no pretraining.
    decoder_init : {"pretrained", "transpose"}
        See the module docstring.
    stages : int, optional
        Number of pretraining stages (default K, i.e. every encoder layer). Encoder layers
        beyond the last stage start at random.
    finetune_sparse : bool or sequence of bool
        Which encoder layers keep their sparsity target during fine-tuning (default none: the
        fine-tuning objective is reconstruction plus weight decay).
    """

    n_visible: int
    hidden: tuple[int, ...]
    activation: str = "sigmoid"
    code_activation: str | None = None
    output_activation: str | None = None
    lam: float = 0.0
    rho: float | None | tuple[float | None, ...] = None
    beta: float = 0.0
    pretrain: str = "previous"
    decoder_init: str = "pretrained"
    stages: int | None = None
    finetune_sparse: bool | tuple[bool, ...] = field(default=False)

    def __post_init__(self) -> None:
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        validate_sizes(self.n_visible, hidden, self.stages)
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        object.__setattr__(self, "n_visible", int(self.n_visible))
        for name in (self.activation, self.code_activation, self.output_activation):
            if name is not None:
                get_activation(name)
        if self.pretrain not in PRETRAIN_CHOICES:
            raise ValueError(f"pretrain: choose one of {PRETRAIN_CHOICES}, got {self.pretrain!r}")
        if self.decoder_init not in DECODER_INIT_CHOICES:
            raise ValueError(
                f"decoder_init: choose one of {DECODER_INIT_CHOICES}, got {self.decoder_init!r}"
            )
        K = len(self.hidden)
        if self.rho is None or isinstance(self.rho, int | float):
            rho = tuple(
                self.rho if get_activation(a).unit_scale is not None else None
                for a in self.encoder_activations
            )
        else:
            rho = tuple(self.rho)
            if len(rho) != K:
                raise ValueError(f"rho: need {K} entries (one per encoder layer), got {len(rho)}")
            for k, (r, a) in enumerate(zip(rho, self.encoder_activations, strict=True), 1):
                if r is not None and get_activation(a).unit_scale is None:
                    raise ValueError(
                        f"rho: encoder layer {k} has {a!r} units, which cannot carry a "
                        "sparsity target"
                    )
        object.__setattr__(self, "rho", rho)
        fs = self.finetune_sparse
        fs = (bool(fs),) * K if isinstance(fs, bool) else tuple(bool(x) for x in fs)
        if len(fs) != K:
            raise ValueError(f"finetune_sparse: need {K} entries (one per encoder layer)")
        object.__setattr__(self, "finetune_sparse", fs)
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam: must be a finite number >= 0, got {self.lam!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta: must be a finite number >= 0, got {self.beta!r}")

    # ---------------------------------------------------------------- architecture
    @property
    def K(self) -> int:
        """Number of encoder layers."""
        return len(self.hidden)

    @property
    def n_stages(self) -> int:
        """Number of pretraining stages (0 for ``pretrain="none"``)."""
        if self.pretrain == "none":
            return 0
        return self.K if self.stages is None else int(self.stages)

    @property
    def encoder_sizes(self) -> tuple[int, ...]:
        """``(n_0, h_1, ..., h_K)``."""
        return (self.n_visible, *self.hidden)

    @property
    def encoder_activations(self) -> tuple[str, ...]:
        """Activations of encoder layers ``1..K``."""
        code = self.code_activation or self.activation
        return (self.activation,) * (self.K - 1) + (code,)

    @property
    def out_activation(self) -> str:
        """Activation of the reconstruction units."""
        return self.output_activation or self.activation

    def layer_activations(self) -> tuple[str, ...]:
        """Activations of the unrolled layers ``1..2K``."""
        return self.encoder_activations + (self.activation,) * (self.K - 1) + (self.out_activation,)

    def network(self) -> Network:
        """The unrolled network ``n_0 -> h_1 .. h_K .. h_1 -> n_0`` that fine-tuning trains."""
        sizes = self.encoder_sizes + tuple(reversed(self.encoder_sizes[:-1]))
        K = self.K
        rho = [r if s else None for r, s in zip(self.rho, self.finetune_sparse, strict=True)]
        rho += [None] * K
        beta = [self.beta if r is not None else 0.0 for r in rho]
        return Network(sizes, self.layer_activations(), self.lam, tuple(rho), tuple(beta))

    def encoder_network(self, k: int) -> Network:
        """The encoder layers ``1..k`` alone: ``n_0 -> h_1 -> ... -> h_k`` (``k >= 1``)."""
        if not 1 <= k <= self.K:
            raise ValueError(f"layer: choose an encoder layer in 1..{self.K}, got {k}")
        return Network(self.encoder_sizes[: k + 1], self.encoder_activations[:k], self.lam)

    def stage_network(self, k: int) -> Network:
        """The sparse autoencoder of pretraining stage k (1-based).

        ``h_{k-1} -> h_k -> h_{k-1}`` for ``pretrain="previous"`` (output units: those of layer
        k-1, i.e. ``output_activation`` for k = 1 and ``activation`` above), and
        ``h_{k-1} -> h_k -> n_0`` with ``output_activation`` for ``pretrain="input"``.
        """
        self._check_stage(k)
        n_in, n_h = self.encoder_sizes[k - 1], self.encoder_sizes[k]
        act = self.encoder_activations[k - 1]
        if self.pretrain == "previous":
            out_act = self.out_activation if k == 1 else self.encoder_activations[k - 2]
            n_out = n_in
        else:
            out_act, n_out = self.out_activation, self.n_visible
        rho = self.rho[k - 1]
        return Network.autoencoder(
            n_in,
            n_h,
            lam=self.lam,
            rho=rho,
            beta=self.beta if rho is not None else 0.0,
            activation=act,
            output_activation=out_act,
            output_size=n_out,
        )

    def stage_target(self, k: int) -> StageTarget:
        """What stage k reconstructs: ``"previous"`` (its own input) or ``"input"`` (x, for a
        stage above the first with ``pretrain="input"``)."""
        self._check_stage(k)
        return "input" if self.pretrain == "input" and k > 1 else "previous"

    def _check_stage(self, k: int) -> None:
        if self.pretrain == "none":
            raise ValueError("pretrain: 'none' has no pretraining stages")
        if not 1 <= k <= self.n_stages:
            raise ValueError(f"stage: choose a stage in 1..{self.n_stages}, got {k}")

    # ---------------------------------------------------------------- parameters
    def stage_encoder(
        self, stage_thetas: Sequence[np.ndarray], k: int
    ) -> tuple[Network, np.ndarray] | None:
        """The frozen encoder that computes stage k's inputs from x (None for k = 1).

        Parameters
        ----------
        stage_thetas : sequence of ndarray
            Trained thetas of stages ``1..k-1`` (at least).
        k : int

        Returns
        -------
        (net, theta) of layers ``1..k-1``, or None when the input is x itself.
        """
        self._check_stage(k)
        if k == 1:
            return None
        net = self.encoder_network(k - 1)
        Ws, bs = [], []
        for j in range(1, k):
            W, b = self._stage_encoder_layer(stage_thetas, j)
            Ws.append(W)
            bs.append(b)
        return net, net.pack(Ws, bs)

    def _stage_encoder_layer(self, stage_thetas, j: int) -> tuple[np.ndarray, np.ndarray]:
        if len(stage_thetas) < j:
            raise ValueError(f"stage_thetas: stage {j} has no trained parameters yet")
        (W1, _), (b1, _) = self.stage_network(j).unpack(np.asarray(stage_thetas[j - 1]))
        return W1, b1

    def random_theta(self, seed: int | None = 0) -> np.ndarray:
        """Random start of the unrolled network (UFLDL initialisation), shape (n_params,)."""
        return self.network().init_theta(seed)

    def assemble(self, stage_thetas: Sequence[np.ndarray], seed: int | None = 0) -> np.ndarray:
        """The fine-tuning start theta of :meth:`network` from the pretrained stages.

        Parameters
        ----------
        stage_thetas : sequence of ndarray
            ``stage_thetas[k-1]`` of shape (stage_network(k).n_params,), for k = 1..n_stages.
        seed : int, optional
            Seed of the random layers (all of them for ``pretrain="none"``; the encoder layers
            beyond ``stages`` otherwise).

        Returns
        -------
        theta : ndarray of shape (network().n_params,)
        """
        S, K = self.n_stages, self.K
        if len(stage_thetas) != S:
            raise ValueError(f"stage_thetas: expected {S} trained stages, got {len(stage_thetas)}")
        net = self.network()
        Ws, bs = (list(a) for a in net.unpack(self.random_theta(seed).copy()))
        dec_W: dict[int, np.ndarray] = {}
        dec_b: dict[int, np.ndarray] = {}
        for k in range(1, S + 1):
            sn = self.stage_network(k)
            (W1, W2), (b1, b2) = sn.unpack(np.asarray(stage_thetas[k - 1], dtype=np.float64))
            Ws[k - 1], bs[k - 1] = W1.copy(), b1.copy()
            if self.pretrain == "previous" or k == 1:
                dec_W[k], dec_b[k] = W2.copy(), b2.copy()
        for k in range(1, K + 1):
            l = 2 * K - k + 1  # the decoder layer mirroring encoder layer k
            if self.decoder_init == "pretrained" and k in dec_W:
                Ws[l - 1] = dec_W[k]
            elif self.decoder_init == "transpose" or self.pretrain != "none":
                Ws[l - 1] = Ws[k - 1].T.copy()
            bs[l - 1] = dec_b[k] if k in dec_b else np.zeros(net.sizes[l])
        return net.pack(Ws, bs)

    def to_dict(self) -> dict:
        """A JSON-able description."""
        return {
            "n_visible": self.n_visible,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "code_activation": self.code_activation,
            "output_activation": self.output_activation,
            "lam": self.lam,
            "rho": list(self.rho),
            "beta": self.beta,
            "pretrain": self.pretrain,
            "decoder_init": self.decoder_init,
            "stages": self.stages,
            "finetune_sparse": list(self.finetune_sparse),
        }


# -------------------------------------------------------------------- models of any depth
def n_encoder_layers(net: Network) -> int:
    """Encoder layers of an autoencoder network: ``L / 2`` for an unrolled net, 1 for L = 2.

    A network of odd depth (a plain feedforward net) is treated as having its code at the
    last hidden layer.
    """
    L = net.n_layers
    return L // 2 if L % 2 == 0 else max(L - 1, 1)


def encode(net: Network, theta: np.ndarray, X: np.ndarray, layer: int | None = None, dtype=None):
    """Codes of layer ``layer`` (default: the innermost code layer) for the rows of X.

    Parameters
    ----------
    net : Network
    theta : ndarray of shape (net.n_params,)
    X : ndarray of shape (m, n_0)
    layer : int, optional
        1-based layer whose activations to return, ``1 <= layer <= L``.

    Returns
    -------
    A : ndarray of shape (m, n_layer)
    """
    k = n_encoder_layers(net) if layer is None else int(layer)
    if not 1 <= k <= net.n_layers:
        raise ValueError(f"layer: choose a layer in 1..{net.n_layers}, got {layer}")
    return forward(net, theta, X, upto=k, dtype=dtype)[k]


def reconstruct(net: Network, theta: np.ndarray, X: np.ndarray, dtype=None) -> np.ndarray:
    """Output of the network, shape (m, n_L)."""
    return forward(net, theta, X, dtype=dtype)[-1]


def squared_error_per_example(
    net: Network, theta: np.ndarray, X: np.ndarray, dtype=None
) -> np.ndarray:
    """``sum_j (x_j - xhat_j)^2`` for every row of X, shape (m,)."""
    d = reconstruct(net, theta, X, dtype=dtype) - X
    return np.einsum("ij,ij->i", d, d)


# -------------------------------------------------------------------- in-memory reference
Minimizer = Callable[[Callable[[np.ndarray], tuple[float, np.ndarray]], np.ndarray, int], tuple]


def lbfgs(f, theta0: np.ndarray, max_iter: int) -> tuple[np.ndarray, list[float]]:
    """Minimise ``f(theta) -> (J, grad)`` with scipy's L-BFGS-B, recording J per iteration.

    Returns
    -------
    theta : ndarray of the shape of theta0
    history : list of float, J at the start and after each iteration
    """
    from scipy.optimize import minimize

    history = [float(f(theta0)[0])]
    if max_iter <= 0:
        return np.array(theta0, dtype=np.float64), history
    last = {}

    def fun(t):
        J, g = f(t)
        last["J"] = J
        return J, g

    res = minimize(
        fun,
        np.array(theta0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxcor": 20},
        callback=lambda xk: history.append(float(f(xk)[0])),
    )
    return res.x, history


@dataclass
class DeepResult:
    """What :func:`pretrain_and_finetune` returns."""

    net: Network
    theta: np.ndarray
    start_theta: np.ndarray
    stage_thetas: list[np.ndarray]
    histories: dict[str, list[float]]


def stage_data(
    arch: DeepArchitecture, stage_thetas: Sequence[np.ndarray], k: int, X: np.ndarray, dtype=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """In-memory inputs and targets of stage k: ``(a_{k-1}, Y)``, Y None when it is a_{k-1}."""
    enc = arch.stage_encoder(stage_thetas, k)
    A = X if enc is None else forward(enc[0], enc[1], X, dtype=dtype)[-1]
    Y = X if arch.stage_target(k) == "input" else None
    return A, Y


def pretrain_and_finetune(
    arch: DeepArchitecture,
    X: np.ndarray,
    max_iter: int,
    finetune_iter: int,
    seed: int = 0,
    minimizer: Minimizer = lbfgs,
    passes: str = "two",
) -> DeepResult:
    """Greedy layer-wise pretraining then fine-tuning, all in memory (the reference).

    Parameters
    ----------
    arch : DeepArchitecture
    X : ndarray of shape (m, n_visible)
    max_iter : int
        Iterations of each pretraining stage.
    finetune_iter : int
        Iterations of fine-tuning.
    seed : int
        Seed of stage k's random start (``seed + k``) and of the unrolled network's.
    minimizer : callable
        ``minimizer(f, theta0, max_iter) -> (theta, history)``.

    Returns
    -------
    DeepResult
    """
    X = np.asarray(X, dtype=np.float64)
    stage_thetas: list[np.ndarray] = []
    histories: dict[str, list[float]] = {}
    for k in range(1, arch.n_stages + 1):
        sn = arch.stage_network(k)
        A, Y = stage_data(arch, stage_thetas, k, X)
        theta, hist = minimizer(
            lambda t, sn=sn, A=A, Y=Y: cost(sn, t, A, Y, passes=passes),
            sn.init_theta(seed + k),
            max_iter,
        )
        stage_thetas.append(np.asarray(theta))
        histories[f"pretrain {k}/{arch.n_stages}"] = hist
    net = arch.network()
    start = arch.assemble(stage_thetas, seed=seed)
    theta, hist = minimizer(lambda t: cost(net, t, X, passes=passes), start, finetune_iter)
    histories["finetune"] = hist
    return DeepResult(net, np.asarray(theta), start, stage_thetas, histories)


# -------------------------------------------------------------------- PCA baseline
def pca_reconstruction_error(X_train: np.ndarray, X_test: np.ndarray, k: int) -> np.ndarray:
    """Squared reconstruction error per row of X_test with the top-k principal components of
    X_train (mean-centred), shape (m_test,)."""
    mu = X_train.mean(axis=0)
    _, _, Vt = np.linalg.svd(X_train - mu, full_matrices=False)
    V = Vt[:k].T
    D = X_test - mu
    R = D - (D @ V) @ V.T
    return np.einsum("ij,ij->i", R, R)
