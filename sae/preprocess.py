"""Preprocessing of image data: patches, the UFLDL normalisation, PCA and ZCA whitening.

Every dataset statistic is fitted from sums that add across chunks of examples, so a fit over
a dataset larger than memory gives the same numbers as a fit over the whole array:

- :class:`NormalizeStats` - count, sum and sum of squares of the mean-removed patch values;
  their standard deviation sets the truncation ``pstd`` of :func:`normalize_patches`.
- :class:`MomentSums` - count, ``sum x`` and ``sum x x^T``; :func:`fit_whitening` turns them
  into a :class:`Whitening` (mean, eigenvectors, eigenvalues of the covariance).

Both have ``of(X)`` (the sums of one chunk), ``a + b``, and ``to_sums()`` / ``from_sums()``
to travel as a flat ``dict[str, ndarray]`` like :func:`sae.objective.add_sums` adds.

Examples are rows throughout: ``X`` has shape ``(m, n)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sae.atomic import atomic_write

Sums = dict[str, np.ndarray]
WhiteningMethod = Literal["pca", "zca"]
WHITENING_METHODS = ("pca", "zca")

#: Natural photographs shipped inside scikit-image (no download): grayscale ones.
GRAY_PHOTOGRAPHS = ("camera", "coins", "moon", "grass", "gravel", "brick")
#: Natural colour photographs shipped inside scikit-image (no download).
RGB_PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")


# ---------------------------------------------------------------------------- patches
def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(images) == 0:
        raise ValueError("images: need at least one image")
    out = []
    for i, img in enumerate(images):
        a = np.asarray(img)
        if a.ndim not in (2, 3):
            raise ValueError(
                f"images[{i}]: expected a 2-D (H, W) or 3-D (H, W, C) array, got shape {a.shape}"
            )
        out.append(a)
    channels = {a.shape[2] if a.ndim == 3 else None for a in out}
    if len(channels) > 1:
        shapes = [a.shape for a in out]
        raise ValueError(
            f"images: all images must have the same number of channels (all 2-D, or all "
            f"(H, W, C) with one C), got shapes {shapes}"
        )
    return out


def sample_patches(
    images: Sequence[np.ndarray], patch_size: int, n_patches: int, seed: int = 0
) -> np.ndarray:
    """Random square patches of a list of images, flattened as rows.

    Every valid patch position of every image is equally likely: an image is chosen with
    probability proportional to its number of valid positions ``(H - p + 1) * (W - p + 1)``,
    then a position uniformly inside it. Patches are drawn independently (with replacement).
    Pixel values are cast to float64 unchanged (use :func:`photographs` for images in [0, 1]).

    Parameters
    ----------
    images : sequence of ndarray, each of shape (H_i, W_i) or (H_i, W_i, C)
        All 2-D (grayscale) or all 3-D with the same number of channels C.
    patch_size : int
        Side ``p`` of the square patches, ``1 <= p <= min(H_i, W_i)``.
    n_patches : int
        Number of patches ``>= 1``.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same patches.

    Returns
    -------
    X : ndarray of shape (n_patches, p * p) or (n_patches, p * p * C), float64
        Row ``i`` is the row-major (C-order) flatten of a ``(p, p)`` or ``(p, p, C)`` patch
        ``image[r:r + p, c:c + p]``.
    """
    imgs = _check_images(images)
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size: must be a positive integer, got {patch_size!r}")
    if isinstance(n_patches, bool) or int(n_patches) != n_patches or n_patches < 1:
        raise ValueError(f"n_patches: must be an integer >= 1, got {n_patches!r}")
    p, n = int(patch_size), int(n_patches)
    for i, a in enumerate(imgs):
        if a.shape[0] < p or a.shape[1] < p:
            raise ValueError(
                f"patch_size: a {p}x{p} patch does not fit in images[{i}] of shape {a.shape}"
            )
    rows_valid = np.array([a.shape[0] - p + 1 for a in imgs])
    cols_valid = np.array([a.shape[1] - p + 1 for a in imgs])
    positions = rows_valid * cols_valid
    rng = np.random.default_rng(seed)
    which = rng.choice(len(imgs), size=n, p=positions / positions.sum())
    r = rng.integers(0, rows_valid[which])
    c = rng.integers(0, cols_valid[which])

    C = imgs[0].shape[2] if imgs[0].ndim == 3 else None
    X = np.empty((n, p * p * (C or 1)), dtype=np.float64)
    for i, a in enumerate(imgs):
        sel = np.flatnonzero(which == i)
        if sel.size == 0:
            continue
        windows = sliding_window_view(a, (p, p), axis=(0, 1))  # (H', W', [C,] p, p)
        block = windows[r[sel], c[sel]]  # (k, [C,] p, p)
        if C is not None:
            block = np.moveaxis(block, 1, -1)  # (k, p, p, C)
        X[sel] = block.reshape(sel.size, -1)
    return X


def photographs(gray: bool = True) -> list[np.ndarray]:
    """Natural photographs shipped inside scikit-image, as float images in [0, 1].

    Only images bundled with the scikit-image package are used, so nothing is downloaded.

    Parameters
    ----------
    gray : bool
        If True, the grayscale photographs :data:`GRAY_PHOTOGRAPHS` and the colour ones
        :data:`RGB_PHOTOGRAPHS` converted with ``skimage.color.rgb2gray``, all 2-D. If False,
        only the colour photographs :data:`RGB_PHOTOGRAPHS`, each 3-D with 3 channels (so that
        :func:`sample_patches` gets images with one number of channels).

    Returns
    -------
    images : list of ndarray, each of shape (H_i, W_i) or (H_i, W_i, 3), float64 in [0, 1]
    """
    import skimage.color
    import skimage.data
    import skimage.util

    names = (GRAY_PHOTOGRAPHS + RGB_PHOTOGRAPHS) if gray else RGB_PHOTOGRAPHS
    out = []
    for name in names:
        img = skimage.util.img_as_float64(getattr(skimage.data, name)())
        if img.ndim == 3 and gray:
            img = skimage.color.rgb2gray(img)
        out.append(np.clip(img, 0.0, 1.0))
    return out


# ---------------------------------------------------------------------------- normalisation
def _remove_dc(X: np.ndarray) -> np.ndarray:
    """X with each row's mean removed; X of shape (m, n) -> (m, n) float64."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected shape (m, n) with examples as rows, got {X.shape}")
    return X - X.mean(axis=1, keepdims=True)


@dataclass(frozen=True)
class NormalizeStats:
    """Sums over the mean-removed patch values that fit ``pstd`` of :func:`normalize_patches`.

    Attributes
    ----------
    count : float
        Number of values (``m * n`` for a chunk of m patches with n values).
    total : float
        Sum of the mean-removed values (0 up to rounding, kept so the std is exact).
    sumsq : float
        Sum of squares of the mean-removed values.
    """

    count: float
    total: float
    sumsq: float

    @classmethod
    def of(cls, X: np.ndarray) -> NormalizeStats:
        """The sums of one chunk ``X`` of shape (m, n), examples as rows."""
        Xc = _remove_dc(X)
        return cls(float(Xc.size), float(Xc.sum()), float(np.einsum("ij,ij->", Xc, Xc)))

    def __add__(self, other: NormalizeStats) -> NormalizeStats:
        if not isinstance(other, NormalizeStats):
            return NotImplemented
        return NormalizeStats(
            self.count + other.count, self.total + other.total, self.sumsq + other.sumsq
        )

    @property
    def std(self) -> float:
        """Sample standard deviation (divisor ``N - 1``, as MATLAB's ``std``) of all values."""
        if self.count < 2:
            raise ValueError("X: need at least two values to estimate a standard deviation")
        var = (self.sumsq - self.total * self.total / self.count) / (self.count - 1)
        return math.sqrt(max(var, 0.0))

    @property
    def pstd(self) -> float:
        """The truncation bound ``3 * std`` of UFLDL's ``normalizeData``."""
        return 3.0 * self.std

    def to_sums(self) -> Sums:
        """A flat dict of float64 arrays of shape () (adds with ``sae.objective.add_sums``)."""
        return {
            "count": np.float64(self.count),
            "total": np.float64(self.total),
            "sumsq": np.float64(self.sumsq),
        }

    @classmethod
    def from_sums(cls, sums: Sums) -> NormalizeStats:
        """Inverse of :meth:`to_sums`."""
        return cls(float(sums["count"]), float(sums["total"]), float(sums["sumsq"]))


def patch_std_sums(X: np.ndarray) -> Sums:
    """The per-chunk sums for the global std of :func:`normalize_patches`.

    Parameters
    ----------
    X : ndarray of shape (m, n)
        One chunk of patches, examples as rows.

    Returns
    -------
    sums : dict
        ``"count"``, ``"total"``, ``"sumsq"`` as float64 arrays of shape (); add the sums of all
        chunks and pass them to ``NormalizeStats.from_sums(sums).pstd``.
    """
    return NormalizeStats.of(X).to_sums()


def normalize_patches(X: np.ndarray, pstd: float | None = None) -> np.ndarray:
    """UFLDL ``normalizeData``: remove each patch's mean, truncate to +/-3 std, map to [0.1, 0.9].

    With ``Xc = X - mean(X, axis=1)`` (the DC component of each patch removed),

        pstd = 3 * std(Xc)          (over all m * n values, divisor m * n - 1)
        Y = (clip(Xc, -pstd, pstd) / pstd + 1) * 0.4 + 0.1

    so that Y suits sigmoid output units.

    Parameters
    ----------
    X : ndarray of shape (m, n)
        Patches as rows.
    pstd : float, optional
        The truncation bound; by default fitted from X itself. For data larger than memory fit
        it chunk by chunk (``sum(NormalizeStats.of(chunk) for chunk in chunks).pstd``) and pass
        it here for each chunk: the result equals the in-memory one.

    Returns
    -------
    Y : ndarray of shape (m, n), float64 in [0.1, 0.9]
    """
    Xc = _remove_dc(X)
    if pstd is None:
        pstd = NormalizeStats.of(Xc).pstd
    if not (math.isfinite(pstd) and pstd > 0):
        raise ValueError(
            f"pstd: the truncation bound must be a finite number > 0, got {pstd!r} (are all "
            "patches constant?)"
        )
    return (np.clip(Xc, -pstd, pstd) / pstd + 1.0) * 0.4 + 0.1


# ---------------------------------------------------------------------------- whitening
@dataclass(frozen=True, eq=False)
class MomentSums:
    """First and second moment sums of a chunk of examples, in float64.

    Attributes
    ----------
    count : float
        Number of examples m.
    sum : ndarray of shape (n,)
        ``sum_i x_i``.
    outer : ndarray of shape (n, n)
        ``sum_i x_i x_i^T``.
    """

    count: float
    sum: np.ndarray
    outer: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> MomentSums:
        """The sums of one chunk ``X`` of shape (m, n), examples as rows."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X: expected shape (m, n) with examples as rows, got {X.shape}")
        return cls(float(X.shape[0]), X.sum(axis=0), X.T @ X)

    def __add__(self, other: MomentSums) -> MomentSums:
        if not isinstance(other, MomentSums):
            return NotImplemented
        if self.sum.shape != other.sum.shape:
            raise ValueError(
                f"MomentSums: cannot add sums over {self.sum.shape[0]} and "
                f"{other.sum.shape[0]} features"
            )
        return MomentSums(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    @property
    def n_features(self) -> int:
        """Number of features n."""
        return int(self.sum.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """``mu = sum / m``, shape (n,)."""
        if self.count <= 0:
            raise ValueError("X: the dataset holds no examples")
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """``Sigma = (1/m) sum_i (x_i - mu)(x_i - mu)^T = E[x x^T] - mu mu^T``, shape (n, n)."""
        mu = self.mean
        sigma = self.outer / self.count - np.outer(mu, mu)
        return 0.5 * (sigma + sigma.T)

    def to_sums(self) -> Sums:
        """A flat dict of float64 arrays (adds with ``sae.objective.add_sums``)."""
        return {"count": np.float64(self.count), "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_sums(cls, sums: Sums) -> MomentSums:
        """Inverse of :meth:`to_sums`."""
        return cls(
            float(sums["count"]),
            np.asarray(sums["sum"], dtype=np.float64),
            np.asarray(sums["outer"], dtype=np.float64),
        )


@dataclass(frozen=True, eq=False)
class Whitening:
    """A fitted PCA or ZCA whitening; build it with :func:`fit_whitening`.

    Attributes
    ----------
    mean : ndarray of shape (n,)
        Feature means removed before rotation.
    U : ndarray of shape (n, n)
        Eigenvectors of the covariance as columns, by decreasing eigenvalue.
    S : ndarray of shape (n,)
        Eigenvalues of the covariance, decreasing, ``>= 0``.
    epsilon : float
        Regulariser added to the eigenvalues.
    method : {"pca", "zca"}
    k : int or None
        Number of components PCA whitening keeps (None: all n). Always None for ZCA.
    """

    mean: np.ndarray
    U: np.ndarray
    S: np.ndarray
    epsilon: float
    method: WhiteningMethod
    k: int | None = None

    @property
    def n_components(self) -> int:
        """Output dimension: k for PCA with k set, else n."""
        return self.S.shape[0] if self.k is None else self.k

    def _check(self, X: np.ndarray, n: int, what: str) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != n:
            raise ValueError(
                f"{what}: expected shape (m, {n}) with examples as rows, got {X.shape}"
            )
        return X

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Whiten examples.

        PCA: ``x_PCAwhite_i = u_i^T (x - mu) / sqrt(lambda_i + epsilon)`` for the top k
        components. ZCA: ``U diag(1 / sqrt(S + epsilon)) U^T (x - mu)``.

        Parameters
        ----------
        X : ndarray of shape (m, n)

        Returns
        -------
        Y : ndarray of shape (m, k) for PCA (k = n unless set), (m, n) for ZCA
        """
        X = self._check(X, self.S.shape[0], "X")
        k = self.n_components
        rot = (X - self.mean) @ self.U[:, :k]
        white = rot / np.sqrt(self.S[:k] + self.epsilon)
        if self.method == "zca":
            return white @ self.U.T
        return white

    def inverse_transform(self, Y: np.ndarray) -> np.ndarray:
        """Map whitened examples back to the input space.

        Exact for ZCA and for PCA with all components; PCA with k < n gives the projection of
        the input onto the top k components.

        Parameters
        ----------
        Y : ndarray of shape (m, k) for PCA, (m, n) for ZCA

        Returns
        -------
        X : ndarray of shape (m, n)
        """
        k = self.n_components
        Y = self._check(Y, k, "Y")
        if self.method == "zca":
            Y = Y @ self.U
        return (Y * np.sqrt(self.S[:k] + self.epsilon)) @ self.U[:, :k].T + self.mean

    def to_dict(self) -> dict:
        """A JSON-able description with nested lists (inverse of :meth:`from_dict`)."""
        return {
            "method": self.method,
            "epsilon": self.epsilon,
            "k": self.k,
            "mean": self.mean.tolist(),
            "U": self.U.tolist(),
            "S": self.S.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Whitening:
        """Rebuild a whitening from :meth:`to_dict` output."""
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            U=np.asarray(d["U"], dtype=np.float64),
            S=np.asarray(d["S"], dtype=np.float64),
            epsilon=float(d["epsilon"]),
            method=_check_method(d["method"]),
            k=None if d.get("k") is None else int(d["k"]),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whitening to an ``.npz`` file atomically; returns the path."""
        arrays = dict(
            mean=self.mean,
            U=self.U,
            S=self.S,
            epsilon=np.float64(self.epsilon),
            method=np.str_(self.method),
            k=np.int64(-1 if self.k is None else self.k),
        )
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        """Read a whitening written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            k = int(z["k"])
            return cls(
                mean=z["mean"],
                U=z["U"],
                S=z["S"],
                epsilon=float(z["epsilon"]),
                method=_check_method(str(z["method"])),
                k=None if k < 0 else k,
            )


def _check_method(method: str) -> WhiteningMethod:
    if method not in WHITENING_METHODS:
        raise ValueError(f"method: choose one of {list(WHITENING_METHODS)}, got {method!r}")
    return method  # type: ignore[return-value]


def fit_whitening(
    sums: MomentSums, method: WhiteningMethod, epsilon: float, k: int | None = None
) -> Whitening:
    """Fit PCA or ZCA whitening from moment sums added over all chunks.

    The covariance ``Sigma = (1/m) sum_i (x_i - mu)(x_i - mu)^T`` comes from the sums as
    ``E[x x^T] - mu mu^T``; its eigenvectors ``U`` and eigenvalues ``S`` (``numpy.linalg.eigh``,
    sorted by decreasing eigenvalue, tiny negative eigenvalues from rounding set to 0) define
    the whitening. Each eigenvector's sign is fixed so that its largest-magnitude entry is
    positive, so a fit is reproducible.

    Parameters
    ----------
    sums : MomentSums
        Sums over the whole dataset of shape (m, n).
    method : {"pca", "zca"}
    epsilon : float
        Regulariser ``>= 0`` added to the eigenvalues before the square root (UFLDL uses 0.1
        for ZCA of image patches, about 1e-5 for PCA of [0, 1] pixels; 0 needs a full-rank
        covariance).
    k : int, optional
        PCA only: keep the top ``k`` components (``1 <= k <= n``); see
        :func:`pca_retained_components`.

    Returns
    -------
    Whitening
    """
    method = _check_method(method)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
    n = sums.n_features
    if k is not None:
        if method == "zca":
            raise ValueError("k: ZCA whitening keeps all components; use method='pca' to keep k")
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
            raise ValueError(f"k: must be an integer in [1, {n}], got {k!r}")
        k = int(k)
    sigma = sums.covariance
    if not np.all(np.isfinite(sigma)):
        raise ValueError("sums: the covariance has non-finite entries")
    S, U = np.linalg.eigh(sigma)
    order = np.argsort(S)[::-1]
    S, U = np.maximum(S[order], 0.0), U[:, order]
    signs = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(n)])
    U = U * np.where(signs == 0, 1.0, signs)
    if epsilon == 0 and S[: k or n].min() <= 0:
        raise ValueError(
            "epsilon: the covariance is singular; whitening needs epsilon > 0 (or fewer "
            "PCA components)"
        )
    return Whitening(mean=sums.mean, U=U, S=S, epsilon=float(epsilon), method=method, k=k)


def pca_retained_components(S: np.ndarray, retain: float = 0.99) -> int:
    """Smallest k whose top-k eigenvalues retain at least ``retain`` of the variance.

    Parameters
    ----------
    S : ndarray of shape (n,)
        Eigenvalues of the covariance (any order; sorted decreasing here).
    retain : float
        Fraction of variance to keep, in (0, 1].

    Returns
    -------
    k : int
        ``min {k : sum(S[:k]) / sum(S) >= retain}``, between 1 and n.
    """
    S = np.sort(np.asarray(S, dtype=np.float64).ravel())[::-1]
    if S.size == 0:
        raise ValueError("S: need at least one eigenvalue")
    if not 0 < retain <= 1:
        raise ValueError(f"retain: must lie in (0, 1], got {retain!r}")
    total = S.sum()
    if not total > 0:
        raise ValueError("S: the eigenvalues sum to zero; no variance to retain")
    frac = np.cumsum(S) / total
    # a small tolerance so that retain=1 (or an exact split) is not lost to rounding
    return int(min(np.searchsorted(frac, retain - 1e-12) + 1, S.size))
