"""Feedforward network specification and the one place theta is packed and unpacked.

A network has layer sizes ``(n_0, n_1, ..., n_L)``; layer ``l`` (1-based, as in the notes) has
weights ``W_l`` of shape ``(n_l, n_{l-1})``, bias ``b_l`` of shape ``(n_l,)`` and activation
``f_l``. All parameters are unrolled into one vector

    theta = [W_1, ..., W_L, b_1, ..., b_L]     (each W row-major)

which for the one-hidden-layer sparse autoencoder is exactly the UFLDL starter order
``[W1 (h x n), W2 (n x h), b1 (h), b2 (n)]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from sae.activations import get_activation
from sae.blas import blas_ready


@dataclass(frozen=True)
class Slot:
    """Where one parameter array lives inside theta."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Network:
    """A feedforward network with an autoencoder objective.

    Parameters
    ----------
    sizes : tuple of int
        ``(n_0, ..., n_L)``, input size first, output size last; ``L >= 1``.
    activations : tuple of str
        Activation of layers ``1..L`` (length ``L``): ``"sigmoid"``, ``"tanh"`` or ``"linear"``.
    lam : float
        Weight decay ``lambda >= 0`` (applied to weights, not to biases).
    rho : tuple of (float or None)
        Sparsity target of layers ``1..L`` (length ``L``), ``None`` where a layer has none. The
        output layer never has one.
    beta : tuple of float
        Weight of the sparsity penalty of layers ``1..L`` (length ``L``), ``>= 0``.
    """

    #: The model kind (:data:`sae.dictionary.KINDS`); subclasses give others.
    kind = "sigmoid-kl"
    #: Whether decoder columns are kept at unit norm (a dictionary's option).
    unit_norm_decoder = False

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    lam: float = 0.0
    rho: tuple[float | None, ...] = field(default=())
    beta: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes: need at least an input and an output size, got {sizes}")
        for n in sizes:
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ValueError(f"sizes: layer sizes must be positive integers, got {sizes}")
        object.__setattr__(self, "sizes", tuple(int(n) for n in sizes))
        L = len(sizes) - 1
        acts = tuple(self.activations)
        if len(acts) != L:
            raise ValueError(f"activations: need {L} names (one per layer), got {len(acts)}")
        for a in acts:
            get_activation(a)
        object.__setattr__(self, "activations", acts)
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam: weight decay must be a finite number >= 0, got {self.lam!r}")
        rho = tuple(self.rho) if self.rho else (None,) * L
        beta = tuple(self.beta) if self.beta else (0.0,) * L
        if len(rho) != L:
            raise ValueError(f"rho: need {L} entries (one per layer), got {len(rho)}")
        if len(beta) != L:
            raise ValueError(f"beta: need {L} entries (one per layer), got {len(beta)}")
        for layer, (r, b, a) in enumerate(zip(rho, beta, acts, strict=True), start=1):
            if not (isinstance(b, int | float) and math.isfinite(b) and b >= 0):
                raise ValueError(f"beta: sparsity weight must be a finite number >= 0, got {b!r}")
            if r is None:
                continue
            if not (isinstance(r, int | float) and 0 < r < 1):
                raise ValueError(f"rho: sparsity target must lie in (0, 1), got {r!r}")
            if layer == L:
                raise ValueError("rho: the output layer cannot have a sparsity target")
            if get_activation(a).unit_scale is None:
                raise ValueError(
                    f"rho: layer {layer} has {a!r} units, which have no bounded range for a "
                    "sparsity target; use sigmoid or tanh units there"
                )
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "beta", tuple(float(b) for b in beta))
        object.__setattr__(self, "lam", float(self.lam))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def autoencoder(
        cls,
        visible_size: int,
        hidden_size: int,
        lam: float = 0.0,
        rho: float | None = None,
        beta: float = 0.0,
        activation: str = "sigmoid",
        output_activation: str | None = None,
        output_size: int | None = None,
    ) -> Network:
        """The one-hidden-layer sparse autoencoder ``visible -> hidden -> visible``.

        ``output_size`` differs from ``visible_size`` only for a pretraining stage whose
        decoder reconstructs another target than its input.
        """
        out = output_activation or activation
        n_out = visible_size if output_size is None else output_size
        return cls(
            sizes=(visible_size, hidden_size, n_out),
            activations=(activation, out),
            lam=lam,
            rho=(rho, None),
            beta=(beta if rho is not None else 0.0, 0.0),
        )

    # ---------------------------------------------------------------- layout
    @property
    def n_layers(self) -> int:
        """Number of weight layers ``L``."""
        return len(self.sizes) - 1

    @cached_property
    def layout(self) -> tuple[Slot, ...]:
        """The slots of ``W_1..W_L`` then ``b_1..b_L`` in theta."""
        slots = []
        pos = 0
        for l in range(1, self.n_layers + 1):
            shape = (self.sizes[l], self.sizes[l - 1])
            size = shape[0] * shape[1]
            slots.append(Slot(f"W{l}", pos, pos + size, shape))
            pos += size
        for l in range(1, self.n_layers + 1):
            slots.append(Slot(f"b{l}", pos, pos + self.sizes[l], (self.sizes[l],)))
            pos += self.sizes[l]
        return tuple(slots)

    @property
    def n_params(self) -> int:
        """Length of theta."""
        return self.layout[-1].stop

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Layers (1-based) that carry a sparsity target."""
        return tuple(l for l, r in enumerate(self.rho, start=1) if r is not None)

    def unpack(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of the weights and biases inside theta.

        Parameters
        ----------
        theta : ndarray of shape (n_params,)

        Returns
        -------
        Ws : list of L ndarrays, ``Ws[l-1]`` of shape (n_l, n_{l-1})
        bs : list of L ndarrays, ``bs[l-1]`` of shape (n_l,)

        Notes
        -----
        The views are of :func:`sae.blas.blas_ready` theta: an unaligned theta (as a Dask
        message can deliver) is copied first, so every product sees one layout.
        """
        theta = blas_ready(theta)
        if theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(
                f"theta: expected a vector of {self.n_params} parameters for sizes "
                f"{self.sizes}, got shape {theta.shape}"
            )
        L = self.n_layers
        arrays = [theta[s.start : s.stop].reshape(s.shape) for s in self.layout]
        return arrays[:L], arrays[L:]

    def pack(self, Ws: list[np.ndarray], bs: list[np.ndarray]) -> np.ndarray:
        """Unroll weights and biases into one theta of shape (n_params,)."""
        L = self.n_layers
        if len(Ws) != L or len(bs) != L:
            raise ValueError(f"pack: need {L} weight matrices and {L} bias vectors")
        theta = np.empty(self.n_params, dtype=np.float64)
        for slot, arr in zip(self.layout, list(Ws) + list(bs), strict=True):
            arr = np.asarray(arr)
            if arr.shape != slot.shape:
                raise ValueError(f"{slot.name}: expected shape {slot.shape}, got {arr.shape}")
            theta[slot.start : slot.stop] = arr.ravel()
        return theta

    def init_theta(self, seed: int | None = 0) -> np.ndarray:
        """UFLDL initialisation: ``W_l ~ U(-r, r)``, ``r = sqrt(6 / (n_in + n_out + 1))``, b = 0.

        Returns
        -------
        theta : ndarray of shape (n_params,)
        """
        rng = np.random.default_rng(seed)
        Ws = []
        for l in range(1, self.n_layers + 1):
            n_out, n_in = self.sizes[l], self.sizes[l - 1]
            r = math.sqrt(6.0 / (n_in + n_out + 1))
            Ws.append(rng.uniform(-r, r, size=(n_out, n_in)))
        bs = [np.zeros(n) for n in self.sizes[1:]]
        return self.pack(Ws, bs)

    def effective(self, theta: np.ndarray) -> np.ndarray:
        """Theta as the model computes with it (the same for this kind)."""
        return np.asarray(theta, dtype=np.float64)

    def project(self, theta: np.ndarray) -> np.ndarray:
        """Theta after a stochastic step, back on the parameters' constraint (none here)."""
        return theta

    def check_X(self, X: np.ndarray, name: str = "X") -> np.ndarray:
        """Validate a data matrix of shape (m, n_0) and return it as an ndarray."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(
                f"{name}: expected shape (m, {self.sizes[0]}) with examples as rows, got {X.shape}"
            )
        return X

    def to_dict(self) -> dict:
        """A JSON-able description (inverse of :meth:`from_dict`)."""
        return {
            "sizes": list(self.sizes),
            "activations": list(self.activations),
            "lam": self.lam,
            "rho": list(self.rho),
            "beta": list(self.beta),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Network:
        """Rebuild a network from :meth:`to_dict` output (a dictionary's too)."""
        if d.get("kind", "sigmoid-kl") != "sigmoid-kl":
            from sae.dictionary import Dictionary

            return Dictionary.from_dict(d)
        return cls(
            sizes=tuple(d["sizes"]),
            activations=tuple(d["activations"]),
            lam=d.get("lam", 0.0),
            rho=tuple(d.get("rho") or ()),
            beta=tuple(d.get("beta") or ()),
        )
