"""The sparse autoencoders interpretability research trains: ReLU + L1 and TopK, as chunk sums.

A :class:`Dictionary` has ``d_in`` inputs and ``d_sae`` latents. With the pre-encoder bias
``b_dec`` (as in Bricken et al. 2023 and SAELens)::

    z     = (x - b_dec) W_enc^T + b_enc                      (d_sae pre-activations)
    f     = ReLU(z)                          ("relu-l1")
          = ReLU(z) on the k largest z, 0 elsewhere  ("topk"; ties with the k-th kept)
    x_hat = f W_dec^T + b_dec

and the cost over m examples::

    J = (1/m) sum_i 1/2 ||x_hat_i - x_i||^2
        + l1 (1/m) sum_i sum_j w_j f_ij                      ("relu-l1"; w_j = 1, or
                                                              ||W_dec[:, j]|| ("decoder-norm"))
        + aux_coeff (1/m) sum_i 1/2 ||x_hat_i + e_hat_i - x_i||^2   ("topk" with AuxK)
        + lam/2 (||W_enc||^2 + ||W_dec||^2)                  (no decay of a unit-norm W_dec)

where ``e_hat = f_aux W_dec^T`` reconstructs the residual from the ``k_aux`` largest
pre-activations of the *dead* latents (OpenAI's AuxK, Gao et al. 2024; here a true term of
the cost, so the gradient is the gradient of J). Dead means: never active on the whole data
(full-batch optimisers: counted in pass 1) or not active in the last ``dead_after`` examples
(stochastic ones: counters carried from step to step and saved in the checkpoint).

Theta keeps the layout of :class:`sae.network.Network` with ``sizes = (d_in, d_sae, d_in)``:
``W1 = W_enc`` (d_sae x d_in), ``W2 = W_dec`` (d_in x d_sae), ``b1 = b_enc``, ``b2 = b_dec``.
With ``unit_norm``, ``W2`` holds ``V`` and the decoder is ``W_dec = V / ||V||`` column by
column (a reparameterisation: the cost is a smooth function of V for full-batch methods; at
``||V|| = 1`` its gradient is the gradient with the component along each column removed, and
:meth:`Dictionary.project` renormalises after each stochastic step).

The chunk functions mirror :mod:`sae.objective` (which dispatches here): :func:`pass1` (firing
counts, only for AuxK), :func:`stats` (dead latents from them), :func:`pass2` (error and
gradient sums), :func:`finalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sae.blas import blas_ready
from sae.blocks import accumulate, colsum, half_sqsum, row_blocks
from sae.network import Network

Sums = dict[str, np.ndarray]

#: Model kinds: the classic CS294A autoencoder and the two of this module.
KINDS = ("sigmoid-kl", "relu-l1", "topk")
DICTIONARY_KINDS = ("relu-l1", "topk")
L1_WEIGHTINGS = ("none", "decoder-norm")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


@dataclass(frozen=True)
class Dictionary(Network):
    """A sparse dictionary ``d_in -> d_sae -> d_in`` (see the module docstring).

    Build one with :meth:`of`. Parameters beyond :class:`~sae.network.Network`'s:

    Parameters
    ----------
    kind : {"relu-l1", "topk"}
    l1 : float
        Weight of the L1 penalty (relu-l1), >= 0.
    l1_weighting : {"none", "decoder-norm"}
        Weight each latent's L1 term by its decoder column's norm (Anthropic, April 2024).
    k : int or None
        Active latents per example (topk), ``1 <= k <= d_sae``.
    k_aux : int or None
        Dead latents that reconstruct the residual (topk's AuxK); None: no AuxK.
    aux_coeff : float
        Weight of the AuxK term, >= 0.
    dead_after : float
        With stochastic optimisers, a latent not active in this many examples is dead.
    unit_norm : bool
        Decoder columns of unit norm (the reparameterisation ``W_dec = V / ||V||``).
    """

    kind: str = "relu-l1"
    l1: float = 0.0
    l1_weighting: str = "none"
    k: int | None = None
    k_aux: int | None = None
    aux_coeff: float = 1.0 / 32.0
    dead_after: float = math.inf
    unit_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.sizes) != 3 or self.sizes[0] != self.sizes[2]:
            raise ValueError(f"sizes: a dictionary is d_in -> d_sae -> d_in, got {self.sizes}")
        d_sae = self.sizes[1]
        if self.kind not in DICTIONARY_KINDS:
            raise ValueError(f"kind: choose one of {list(KINDS)}, got {self.kind!r}")
        if not (_finite(self.l1) and self.l1 >= 0):
            raise ValueError(f"l1: the L1 weight must be a finite number >= 0, got {self.l1!r}")
        if self.l1_weighting not in L1_WEIGHTINGS:
            raise ValueError(
                f"l1_weighting: choose one of {list(L1_WEIGHTINGS)}, got {self.l1_weighting!r}"
            )
        if self.kind == "topk":
            _check_k("k", self.k, d_sae)
            if self.k_aux is not None:
                _check_k("k_aux", self.k_aux, d_sae)
        else:
            for name in ("k", "k_aux"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for kind 'topk', not {self.kind!r}")
        if not (_finite(self.aux_coeff) and self.aux_coeff >= 0):
            raise ValueError(f"aux_coeff: must be a finite number >= 0, got {self.aux_coeff!r}")
        if not (isinstance(self.dead_after, int | float) and self.dead_after >= 1):
            raise ValueError(f"dead_after: must be >= 1 example, got {self.dead_after!r}")
        object.__setattr__(self, "l1", float(self.l1))
        object.__setattr__(self, "aux_coeff", float(self.aux_coeff))
        object.__setattr__(self, "dead_after", float(self.dead_after))
        object.__setattr__(self, "unit_norm", bool(self.unit_norm))

    @classmethod
    def of(cls, kind: str, d_in: int, d_sae: int, **options) -> Dictionary:
        """The dictionary of ``kind`` with ``d_in`` inputs and ``d_sae`` latents.

        ``options``: ``l1``, ``l1_weighting``, ``k``, ``k_aux``, ``aux_coeff``, ``dead_after``,
        ``unit_norm``, ``lam``.
        """
        return cls(sizes=(d_in, d_sae, d_in), activations=("relu", "linear"), kind=kind, **options)

    # ---------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.sizes[0]

    @property
    def d_sae(self) -> int:
        return self.sizes[1]

    @property
    def unit_norm_decoder(self) -> bool:
        return self.unit_norm

    @property
    def uses_aux(self) -> bool:
        """True for TopK with an AuxK term (which needs the dead latents: pass 1)."""
        return self.kind == "topk" and self.k_aux is not None and self.aux_coeff > 0

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """``(1,)`` when pass 1 is needed (AuxK's firing counts), else ``()``."""
        return (1,) if self.uses_aux else ()

    # ---------------------------------------------------------------- parameters
    def decoder(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(W_dec, norms)``: the decoder of shape (d_in, d_sae) and, with ``unit_norm``, the
        norms of V's columns (shape (d_sae,)); without, ``(V, None)``."""
        V = self.unpack(theta)[0][1]
        if not self.unit_norm:
            return V, None
        norms = np.sqrt(np.einsum("ij,ij->j", V, V))
        with np.errstate(divide="ignore", invalid="ignore"):
            return V / norms, norms

    def effective(self, theta: np.ndarray) -> np.ndarray:
        """Theta with the decoder the model computes with (unit columns with ``unit_norm``).

        Returns
        -------
        theta : ndarray of shape (n_params,)
        """
        if not self.unit_norm:
            return np.array(theta, dtype=np.float64)
        Ws, bs = self.unpack(theta)
        return self.pack([Ws[0], self.decoder(theta)[0]], bs)

    def project(self, theta: np.ndarray) -> np.ndarray:
        """Theta after a stochastic step: unit decoder columns again (identity otherwise)."""
        return self.effective(theta) if self.unit_norm else theta

    def init_theta(
        self, seed: int | None = 0, mean: np.ndarray | None = None, tied: bool = True
    ) -> np.ndarray:
        """Decoder columns in random directions (unit norm), ``W_enc = W_dec^T`` when ``tied``
        (else the UFLDL uniform initialisation), ``b_enc = 0`` and ``b_dec = mean``.

        Parameters
        ----------
        seed : int, optional
        mean : ndarray of shape (d_in,), optional
            The data's mean (default zeros).
        tied : bool

        Returns
        -------
        theta : ndarray of shape (n_params,)
        """
        rng = np.random.default_rng(seed)
        n, h = self.d_in, self.d_sae
        W_dec = rng.standard_normal((n, h))
        W_dec /= np.sqrt(np.einsum("ij,ij->j", W_dec, W_dec))
        if tied:
            W_enc = W_dec.T.copy()
        else:
            r = math.sqrt(6.0 / (n + h + 1))
            W_enc = rng.uniform(-r, r, size=(h, n))
        b_dec = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64)
        if b_dec.shape != (n,):
            raise ValueError(f"mean: expected shape ({n},), got {b_dec.shape}")
        return self.pack([W_enc, W_dec], [np.zeros(h), b_dec])

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(
            kind=self.kind,
            l1=self.l1,
            l1_weighting=self.l1_weighting,
            k=self.k,
            k_aux=self.k_aux,
            aux_coeff=self.aux_coeff,
            dead_after=None if math.isinf(self.dead_after) else self.dead_after,
            unit_norm=self.unit_norm,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Dictionary:
        dead = d.get("dead_after")
        return cls(
            sizes=tuple(d["sizes"]),
            activations=tuple(d["activations"]),
            lam=d.get("lam", 0.0),
            kind=d["kind"],
            l1=d.get("l1", 0.0),
            l1_weighting=d.get("l1_weighting", "none"),
            k=d.get("k"),
            k_aux=d.get("k_aux"),
            aux_coeff=d.get("aux_coeff", 1.0 / 32.0),
            dead_after=math.inf if dead is None else dead,
            unit_norm=d.get("unit_norm", True),
        )


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_k(name: str, k, d_sae: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= d_sae:
        raise ValueError(f"{name}: must be an integer from 1 to the hidden size {d_sae}, got {k!r}")


# ----------------------------------------------------------------------------- forward


def _top(z: np.ndarray, k: int) -> np.ndarray:
    """ReLU of the ``k`` largest entries of each row of ``z`` (and of any tied with the k-th),
    zeros elsewhere: the same set whatever algorithm numpy's partition uses on a CPU."""
    f = np.maximum(z, 0)
    if k < z.shape[1]:
        kth = np.partition(z, z.shape[1] - k, axis=1)[:, z.shape[1] - k]
        f[z < kth[:, None]] = 0
    return f


def encode(
    net: Dictionary, theta: np.ndarray, X: np.ndarray, dt, mm=np.matmul
) -> tuple[np.ndarray, ...]:
    """``(Xc, z, f)``: centred inputs ``x - b_dec``, pre-activations and latents, each of
    shape (m, .) in the compute dtype ``dt`` (``mm``: the matrix product,
    :func:`sae.blocks.matmul`)."""
    Ws, bs = net.unpack(theta)
    Xc = blas_ready(X, dt) - bs[1].astype(dt)
    z = mm(Xc, Ws[0].astype(dt, copy=False).T)
    z += bs[0].astype(dt)
    f = np.maximum(z, 0) if net.kind == "relu-l1" else _top(z, net.k)
    return Xc, z, f


def forward(net: Dictionary, theta: np.ndarray, X: np.ndarray, upto: int | None, dt):
    """``[X, f, x_hat]`` (``[X, f]`` for ``upto=1``), as :func:`sae.objective.forward`."""
    X = blas_ready(net.check_X(X), dt)
    _, _, f = encode(net, theta, X, dt)
    if upto == 1:
        return [X, f]
    if upto == 0:
        return [X]
    W_dec = net.decoder(theta)[0].astype(dt, copy=False)
    x_hat = f @ W_dec.T
    x_hat += net.unpack(theta)[1][1].astype(dt)
    return [X, f, x_hat]


# ----------------------------------------------------------------------------- chunk sums


def pass1(net: Dictionary, theta: np.ndarray, X: np.ndarray, dt, mm=np.matmul) -> Sums:
    """``"count"`` and, for AuxK, ``"fired1"``: how many examples each latent is active on,
    shape (d_sae,)."""
    sums: Sums = {"count": _f64(np.asarray(X).shape[0])}
    if net.uses_aux:
        X = net.check_X(X)
        fired = np.zeros(net.d_sae)
        for rows in row_blocks(X.shape[0]):
            _, _, f = encode(net, theta, X[rows], dt, mm)
            fired += np.count_nonzero(f > 0, axis=0)
        sums["fired1"] = fired
    return sums


def stats(net: Dictionary, sums: Sums) -> dict[int, np.ndarray]:
    """Examples since each latent was last active, from whole-data pass-1 totals: 0 for the
    active ones, inf for those never active (dead whatever ``dead_after`` is)."""
    if not net.uses_aux:
        return {}
    if float(sums["count"]) <= 0:
        raise ValueError("X: the dataset holds no examples")
    return {1: np.where(sums["fired1"] > 0, 0.0, math.inf)}


def since_fired(net: Dictionary, sums: Sums, previous: dict | None) -> dict[int, np.ndarray]:
    """The counters of a stochastic step: examples since each latent was last active, after
    the batch whose pass-1 totals are ``sums`` (``previous``: the counters before it)."""
    if not net.uses_aux:
        return {}
    before = np.zeros(net.d_sae) if not previous else np.asarray(previous[1], dtype=np.float64)
    return {1: np.where(sums["fired1"] > 0, 0.0, before + float(sums["count"]))}


def dead_mask(net: Dictionary, stats_: dict | None) -> np.ndarray | None:
    """Which latents are dead (shape (d_sae,), bool), or None without AuxK or dead latents."""
    if not net.uses_aux or not stats_:
        return None
    dead = np.asarray(stats_[1]) >= net.dead_after
    return dead if dead.any() else None


def pass2(
    net: Dictionary,
    theta: np.ndarray,
    X: np.ndarray,
    stats_: dict | None,
    Y: np.ndarray | None,
    dt,
    mm=np.matmul,
) -> Sums:
    """Error and gradient sums on one chunk, in row blocks of
    :data:`sae.blocks.BLOCK_ROWS` added in float64 in row order.

    Parameters
    ----------
    net : Dictionary
    theta : ndarray of shape (n_params,)
    X : ndarray of shape (m_chunk, d_in)
    stats_ : dict or None
        From :func:`stats` or :func:`since_fired` (AuxK's dead latents).
    Y : None
        Dictionaries reconstruct their input.
    dt : numpy float type
        Of the elementwise work.
    mm : callable, optional
        The matrix product (:func:`sae.blocks.matmul`; bfloat16 products through PyTorch).

    Returns
    -------
    sums : dict
        ``"count"``; ``"err"`` = sum_i 1/2 ||x_hat - x||^2; ``"aux"`` = sum_i 1/2 ||x_hat +
        e_hat - x||^2; ``"l1"`` = sum_i f_i of shape (d_sae,); and the gradient sums with
        respect to the effective parameters: ``"W1"`` (d_sae, d_in), ``"b1"`` (d_sae,),
        ``"W2"`` (d_in, d_sae), ``"b2"`` (d_in,).
    """
    if Y is not None:
        raise ValueError("Y: a dictionary reconstructs its input; targets are not supported")
    X = blas_ready(net.check_X(X), dt)
    Ws, bs = net.unpack(theta)
    W_dec = blas_ready(net.decoder(theta)[0], dt)
    p = _Params(
        W_enc=blas_ready(Ws[0], dt),
        b_enc=bs[0].astype(dt),
        b_dec=bs[1].astype(dt),
        W_dec=W_dec,
        l1=(
            dt(net.l1) * _l1_weights(net, theta).astype(dt)
            if net.kind == "relu-l1" and net.l1 > 0
            else None
        ),
        dead=dead_mask(net, stats_),
    )
    if p.dead is not None:
        p.W_dead = blas_ready(W_dec[:, p.dead], dt)
    total: Sums | None = None
    for rows in row_blocks(X.shape[0]):
        total = accumulate(total, _pass2_block(net, p, X[rows], dt, mm))
    total["count"] = _f64(X.shape[0])
    return total


@dataclass
class _Params:
    """Theta in the compute dtype, unpacked once per chunk for :func:`_pass2_block`."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    b_dec: np.ndarray
    W_dec: np.ndarray
    l1: np.ndarray | None
    dead: np.ndarray | None
    W_dead: np.ndarray | None = None


def _pass2_block(net: Dictionary, p: _Params, X: np.ndarray, dt, mm) -> Sums:
    """The sums of :func:`pass2` on one block of rows (shape (b, d_in)), in ``dt`` but for
    the scalars."""
    Xc = X - p.b_dec
    z = mm(Xc, p.W_enc.T)
    z += p.b_enc
    f = np.maximum(z, 0) if net.kind == "relu-l1" else _top(z, net.k)
    x_hat = mm(f, p.W_dec.T)
    x_hat += p.b_dec
    d = x_hat - X
    sums: Sums = {"err": half_sqsum(d), "aux": _f64(0.0), "l1": colsum(f)}
    dead = p.dead
    g_out = d
    if dead is not None:
        alpha = dt(net.aux_coeff)
        ka = min(net.k_aux, int(dead.sum()))
        f_aux = _top(z[:, dead], ka)
        r = mm(f_aux, p.W_dead.T)
        r += d  # x_hat + e_hat - x
        sums["aux"] = half_sqsum(r)
        r *= alpha
        g_out = d + r
    W2 = mm(g_out.T, f)
    back = mm(g_out, p.W_dec)
    if p.l1 is not None:
        back += p.l1
    back *= f > 0
    if dead is not None:
        W2[:, dead] += mm(r.T, f_aux)
        back_aux = mm(r, p.W_dead)
        back_aux *= f_aux > 0
        back[:, dead] += back_aux
    sums["W1"] = mm(back.T, Xc)
    sums["b1"] = colsum(back)
    sums["W2"] = W2
    sums["b2"] = colsum(g_out)
    return sums


def _l1_weights(net: Dictionary, theta: np.ndarray) -> np.ndarray:
    """``w_j`` of the L1 term, shape (d_sae,): ones, or the decoder columns' norms."""
    if net.l1_weighting == "none":
        return np.ones(net.d_sae)
    W_dec = net.decoder(theta)[0]
    return np.sqrt(np.einsum("ij,ij->j", W_dec, W_dec))


def finalize(net: Dictionary, theta: np.ndarray, sums: Sums) -> tuple[float, np.ndarray]:
    """Cost and gradient (with respect to theta, through the unit-norm reparameterisation)
    from the dataset totals of :func:`pass2`.

    Returns
    -------
    J : float
    grad : ndarray of shape (n_params,)
    """
    m = float(sums["count"])
    if m <= 0:
        raise ValueError("X: the dataset holds no examples")
    Ws, _ = net.unpack(theta)
    W_enc, V = Ws
    W_dec, norms = net.decoder(theta)
    J = (float(sums["err"]) + net.aux_coeff * float(sums["aux"])) / m
    g_enc = sums["W1"] / m
    gb_enc = sums["b1"] / m
    g_dec = sums["W2"] / m
    gb_dec = sums["b2"] / m - W_enc.T @ gb_enc
    if net.kind == "relu-l1" and net.l1 > 0:
        w = _l1_weights(net, theta)
        J += net.l1 * float(np.dot(w, sums["l1"])) / m
        if net.l1_weighting == "decoder-norm":
            with np.errstate(divide="ignore", invalid="ignore"):
                g_dec = g_dec + net.l1 * (sums["l1"] / m) * np.where(w > 0, W_dec / w, 0.0)
    if net.lam > 0:
        J += 0.5 * net.lam * float(np.vdot(W_enc, W_enc))
        g_enc = g_enc + net.lam * W_enc
    if norms is None:
        if net.lam > 0:
            J += 0.5 * net.lam * float(np.vdot(V, V))
            g_dec = g_dec + net.lam * V
        g_V = g_dec
    else:  # d/dV of W_dec = V / ||V||, column by column
        g_V = (g_dec - W_dec * np.einsum("ij,ij->j", W_dec, g_dec)) / norms
    grad = net.pack([g_enc, g_V], [gb_enc, gb_dec])
    if not np.isfinite(J) or not np.all(np.isfinite(grad)):
        if norms is not None and not np.all(norms > 0):
            why = "a decoder column has norm 0"
        else:
            why = "non-finite values in the data or parameters"
        raise FloatingPointError(f"objective: cost or gradient is not finite: {why}")
    return J, grad
