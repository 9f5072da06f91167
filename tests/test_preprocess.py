"""Tests of sae.preprocess: patches, UFLDL normalisation, PCA/ZCA whitening from chunk sums."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae.objective import add_sums
from sae.preprocess import (
    MomentSums,
    NormalizeStats,
    Whitening,
    fit_whitening,
    normalize_patches,
    patch_std_sums,
    pca_retained_components,
    photographs,
    sample_patches,
)


# ---------------------------------------------------------------------------- patches
def _locate(image: np.ndarray, patch: np.ndarray) -> tuple[int, int]:
    """Position of a patch taken from an arange image (values encode their position)."""
    H, W = image.shape[:2]
    first = int(patch.flat[0]) // (image.shape[2] if image.ndim == 3 else 1)
    return divmod(first, W)


def test_patches_of_gray_image_are_contiguous_sub_blocks():
    H, W, p = 13, 17, 5
    image = np.arange(H * W, dtype=np.float64).reshape(H, W)
    X = sample_patches([image], p, 300, seed=3)
    assert X.shape == (300, p * p) and X.dtype == np.float64
    seen = set()
    for row in X:
        r, c = _locate(image, row)
        assert 0 <= r <= H - p and 0 <= c <= W - p
        np.testing.assert_array_equal(row, image[r : r + p, c : c + p].ravel())
        seen.add((r, c))
    # 300 draws over 9 * 13 = 117 positions reach most of them, including the last row/column
    assert len(seen) > 80
    assert max(r for r, _ in seen) == H - p and max(c for _, c in seen) == W - p


def test_patches_of_rgb_image_flatten_row_major_with_channels_last():
    H, W, C, p = 9, 11, 3, 4
    image = np.arange(H * W * C, dtype=np.float64).reshape(H, W, C)
    X = sample_patches([image], p, 100, seed=0)
    assert X.shape == (100, p * p * C)
    for row in X:
        r, c = _locate(image, row)
        np.testing.assert_array_equal(row, image[r : r + p, c : c + p, :].ravel())


def test_patches_weight_images_by_number_of_positions():
    # image a: 1 valid position of a 4x4 patch; image b: 7 * 7 = 49 positions
    a = np.full((4, 4), -1.0)
    b = np.arange(100, dtype=np.float64).reshape(10, 10)
    X = sample_patches([a, b], 4, 5000, seed=7)
    from_a = np.mean(X[:, 0] == -1.0)
    assert from_a == pytest.approx(1 / 50, abs=0.01)
    for row in X[X[:, 0] != -1.0]:
        r, c = _locate(b, row)
        np.testing.assert_array_equal(row, b[r : r + 4, c : c + 4].ravel())


def test_patches_are_seeded():
    image = np.random.default_rng(0).random((20, 20))
    a = sample_patches([image], 6, 50, seed=1)
    np.testing.assert_array_equal(a, sample_patches([image], 6, 50, seed=1))
    assert not np.array_equal(a, sample_patches([image], 6, 50, seed=2))


@pytest.mark.parametrize(
    ("images", "p", "n", "match"),
    [
        ([np.zeros((5, 8))], 6, 10, "does not fit"),
        ([np.zeros((8, 8)), np.zeros((8, 3))], 4, 10, r"images\[1\]"),
        ([np.zeros((8, 8))], 4, 0, "n_patches"),
        ([np.zeros((8, 8))], 0, 3, "patch_size"),
        ([], 4, 3, "at least one image"),
        ([np.zeros(8)], 2, 3, "2-D"),
        ([np.zeros((8, 8)), np.zeros((8, 8, 3))], 2, 3, "channels"),
    ],
)
def test_patches_reject_bad_arguments(images, p, n, match):
    with pytest.raises(ValueError, match=match):
        sample_patches(images, p, n)


def test_photographs_load_offline_in_unit_range():
    gray = photographs()
    assert len(gray) >= 8
    for img in gray:
        assert img.ndim == 2 and img.dtype == np.float64
        assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.01
    rgb = photographs(gray=False)
    assert len(rgb) >= 3
    for img in rgb:
        assert img.ndim == 3 and img.shape[2] == 3
        assert img.min() >= 0 and img.max() <= 1
    X = sample_patches(rgb, 8, 20)
    assert X.shape == (20, 192)


# ---------------------------------------------------------------------------- normalisation
def _normalize_loop(X: np.ndarray) -> np.ndarray:
    """UFLDL normalizeData written out with loops (patches as rows here)."""
    m, n = X.shape
    Xc = np.empty((m, n))
    for i in range(m):
        mu = sum(X[i]) / n
        for j in range(n):
            Xc[i, j] = X[i, j] - mu
    values = Xc.ravel().tolist()
    N = len(values)
    mean = sum(values) / N
    std = (sum((v - mean) ** 2 for v in values) / (N - 1)) ** 0.5  # MATLAB std(X(:))
    pstd = 3 * std
    out = np.empty((m, n))
    for i in range(m):
        for j in range(n):
            v = max(min(Xc[i, j], pstd), -pstd) / pstd
            out[i, j] = (v + 1) * 0.4 + 0.1
    return out


def _heavy_tailed(m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_t(2, size=(m, n)) + rng.normal(size=(m, 1)) * 5


def test_normalize_matches_ufldl_definition_and_range():
    X = _heavy_tailed(60, 16)
    Y = normalize_patches(X)
    np.testing.assert_allclose(Y, _normalize_loop(X), rtol=0, atol=1e-12)
    assert Y.min() >= 0.1 and Y.max() <= 0.9
    # heavy tails: some values are truncated onto the bounds
    assert np.isclose(Y.min(), 0.1) and np.isclose(Y.max(), 0.9)


def test_normalize_removes_dc_component():
    X = _heavy_tailed(30, 9)
    shifted = X + np.arange(30)[:, None] * 100.0
    np.testing.assert_allclose(normalize_patches(shifted), normalize_patches(X), atol=1e-9)


def test_normalize_chunked_fit_equals_in_memory():
    X = _heavy_tailed(100, 25, seed=1)
    chunks = np.array_split(X, 3)
    stats = NormalizeStats.of(chunks[0]) + NormalizeStats.of(chunks[1])
    stats = stats + NormalizeStats.of(chunks[2])
    one = NormalizeStats.of(X)
    assert stats.count == one.count == X.size
    assert stats.pstd == pytest.approx(one.pstd, rel=1e-12)
    chunked = np.vstack([normalize_patches(c, pstd=stats.pstd) for c in chunks])
    np.testing.assert_allclose(chunked, normalize_patches(X), rtol=0, atol=1e-12)
    # the same sums travel as flat dicts that sae.objective.add_sums adds
    a, b, c = (patch_std_sums(chunk) for chunk in chunks)
    sums = add_sums(add_sums(a, b), c)
    assert NormalizeStats.from_sums(sums).pstd == pytest.approx(one.pstd, rel=1e-12)
    Xc = X - X.mean(axis=1, keepdims=True)
    assert one.pstd == pytest.approx(3 * np.std(Xc, ddof=1), rel=1e-12)


def test_normalize_applies_given_pstd():
    X = _heavy_tailed(10, 4)
    Xc = X - X.mean(axis=1, keepdims=True)
    Y = normalize_patches(X, pstd=2.0)
    np.testing.assert_allclose(Y, (np.clip(Xc, -2, 2) / 2 + 1) * 0.4 + 0.1)


def test_normalize_rejects_constant_patches():
    with pytest.raises(ValueError, match="pstd"):
        normalize_patches(np.ones((5, 4)) * np.arange(5)[:, None])


# ---------------------------------------------------------------------------- whitening
def _correlated(m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n)) * np.linspace(3, 0.2, n)
    return rng.normal(size=(m, n)) @ A.T + rng.normal(size=n) * 4


def _cov(Y: np.ndarray) -> np.ndarray:
    Yc = Y - Y.mean(axis=0)
    return Yc.T @ Yc / Y.shape[0]


def test_moment_sums_chunked_equal_one_shot():
    X = _correlated(200, 6)
    chunks = np.array_split(X, 3)
    total = MomentSums.of(chunks[0]) + MomentSums.of(chunks[1]) + MomentSums.of(chunks[2])
    one = MomentSums.of(X)
    assert total.count == one.count == 200
    np.testing.assert_allclose(total.sum, one.sum, rtol=1e-12)
    np.testing.assert_allclose(total.outer, one.outer, rtol=1e-12)
    np.testing.assert_allclose(total.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(total.covariance, np.cov(X.T, bias=True), rtol=1e-9, atol=1e-12)
    a, b, c = (MomentSums.of(chunk).to_sums() for chunk in chunks)
    dict_sum = add_sums(add_sums(a, b), c)
    np.testing.assert_allclose(MomentSums.from_sums(dict_sum).outer, one.outer, rtol=1e-12)
    # the whitening fitted chunk by chunk equals the one-shot fit
    a, b = fit_whitening(total, "zca", 1e-3), fit_whitening(one, "zca", 1e-3)
    np.testing.assert_allclose(a.transform(X), b.transform(X), rtol=1e-8, atol=1e-10)


def test_moment_sums_reject_mismatched_features():
    with pytest.raises(ValueError, match="features"):
        MomentSums.of(np.ones((3, 2))) + MomentSums.of(np.ones((3, 4)))


def test_eigen_decomposition_sorted_and_orthonormal():
    X = _correlated(500, 7)
    w = fit_whitening(MomentSums.of(X), "pca", 0.0)
    assert np.all(np.diff(w.S) <= 0)
    np.testing.assert_allclose(w.U.T @ w.U, np.eye(7), atol=1e-12)
    np.testing.assert_allclose(w.U @ np.diag(w.S) @ w.U.T, _cov(X), atol=1e-9)


def test_zca_whitened_covariance_is_identity_for_tiny_epsilon():
    X = _correlated(2000, 8)
    w = fit_whitening(MomentSums.of(X), "zca", 1e-12)
    Y = w.transform(X)
    assert Y.shape == X.shape
    np.testing.assert_allclose(_cov(Y), np.eye(8), atol=1e-8)
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-10)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitened_covariance_with_epsilon(method):
    X = _correlated(1000, 6, seed=2)
    eps = 0.5
    w = fit_whitening(MomentSums.of(X), method, eps)
    shrink = np.diag(w.S / (w.S + eps))
    expected = shrink if method == "pca" else w.U @ shrink @ w.U.T
    np.testing.assert_allclose(_cov(w.transform(X)), expected, atol=1e-9)
    assert not np.allclose(expected, np.eye(6), atol=1e-2)  # epsilon matters here


def test_zca_matrix_is_symmetric():
    X = _correlated(300, 5, seed=3)
    w = fit_whitening(MomentSums.of(X), "zca", 0.1)
    # rows of transform(mean + I) are the images of the basis vectors: the matrix transposed
    M = w.transform(w.mean + np.eye(5))
    np.testing.assert_allclose(M, M.T, atol=1e-12)
    # and it is not the PCA rotation, which is not symmetric in general
    P = fit_whitening(MomentSums.of(X), "pca", 0.1).transform(w.mean + np.eye(5))
    assert not np.allclose(P, P.T, atol=1e-3)


def test_pca_with_k_components_has_identity_covariance():
    X = _correlated(1500, 10, seed=4)
    w = fit_whitening(MomentSums.of(X), "pca", 1e-12, k=4)
    Y = w.transform(X)
    assert Y.shape == (1500, 4)
    np.testing.assert_allclose(_cov(Y), np.eye(4), atol=1e-8)
    # the inverse gives the projection onto the top 4 components
    Xk = w.inverse_transform(Y)
    Uk = w.U[:, :4]
    np.testing.assert_allclose(Xk, (X - w.mean) @ Uk @ Uk.T + w.mean, atol=1e-8)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_inverse_transform_round_trip(method):
    X = _correlated(100, 6, seed=5)
    w = fit_whitening(MomentSums.of(X), method, 0.01)
    np.testing.assert_allclose(w.inverse_transform(w.transform(X)), X, atol=1e-9)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitening_serialises(method, tmp_path):
    X = _correlated(100, 5, seed=6)
    k = 3 if method == "pca" else None
    w = fit_whitening(MomentSums.of(X), method, 0.05, k=k)
    back = Whitening.from_dict(json.loads(json.dumps(w.to_dict())))
    np.testing.assert_array_equal(back.transform(X), w.transform(X))
    assert (back.method, back.k, back.epsilon) == (method, k, 0.05)
    loaded = Whitening.load(w.save(tmp_path / "white.npz"))
    np.testing.assert_array_equal(loaded.transform(X), w.transform(X))
    assert (loaded.method, loaded.k) == (method, k)
    assert [p.name for p in tmp_path.iterdir()] == ["white.npz"]


def test_fit_whitening_rejects_bad_arguments():
    sums = MomentSums.of(_correlated(50, 4))
    with pytest.raises(ValueError, match="method"):
        fit_whitening(sums, "svd", 0.1)
    with pytest.raises(ValueError, match="k"):
        fit_whitening(sums, "pca", 0.1, k=5)
    with pytest.raises(ValueError, match="ZCA"):
        fit_whitening(sums, "zca", 0.1, k=2)
    with pytest.raises(ValueError, match="epsilon"):
        fit_whitening(sums, "zca", -1.0)
    singular = MomentSums.of(np.ones((10, 3)) * np.arange(10)[:, None])
    with pytest.raises(ValueError, match="singular"):
        fit_whitening(singular, "zca", 0.0)


def test_pca_retained_components():
    S = np.array([5.0, 3.0, 1.0, 1.0])
    assert pca_retained_components(S, 0.5) == 1
    assert pca_retained_components(S, 0.8) == 2
    assert pca_retained_components(S, 0.81) == 3
    assert pca_retained_components(S, 1.0) == 4
    assert pca_retained_components(S[::-1], 0.8) == 2  # order does not matter
    assert pca_retained_components(np.array([1.0, 0.0, 0.0]), 1.0) == 1
    with pytest.raises(ValueError, match="retain"):
        pca_retained_components(S, 0.0)
    X = _correlated(400, 12, seed=8)
    w = fit_whitening(MomentSums.of(X), "pca", 0.0)
    k = pca_retained_components(w.S, 0.99)
    assert w.S[:k].sum() / w.S.sum() >= 0.99 > w.S[: k - 1].sum() / w.S.sum()
