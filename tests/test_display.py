"""Tests of sae.display: maximally activating inputs, tiling, PNG files written atomically."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sae import display
from sae.display import (
    max_activating_inputs,
    save_cost_png,
    save_filters_png,
    save_images_png,
    tile_images,
)


def _tile(image: np.ndarray, i: int, h: int, w: int, n_cols: int, pad: int = 1) -> np.ndarray:
    r, c = divmod(i, n_cols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    return image[top : top + h, left : left + w]


# ---------------------------------------------------------------------------- max activating
def test_max_activating_inputs_have_unit_norm_and_maximise_activation():
    rng = np.random.default_rng(0)
    W1 = rng.normal(size=(12, 30)) * rng.uniform(0.1, 10, size=(12, 1))
    X = max_activating_inputs(W1)
    assert X.shape == W1.shape
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
    best = np.einsum("ij,ij->i", W1, X)
    np.testing.assert_allclose(best, np.linalg.norm(W1, axis=1), rtol=1e-12)
    U = rng.normal(size=(5000, 30))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    assert np.all((W1 @ U.T).max(axis=1) < best)
    # perturbing the maximiser on the unit sphere lowers the activation
    Y = X + 0.01 * rng.normal(size=X.shape)
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    assert np.all(np.einsum("ij,ij->i", W1, Y) < best)


def test_max_activating_inputs_zero_row_gives_zeros():
    W1 = np.array([[0.0, 0.0], [3.0, 4.0]])
    X = max_activating_inputs(W1)
    np.testing.assert_array_equal(X, [[0.0, 0.0], [0.6, 0.8]])


# ---------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(
    ("n", "n_cols", "pad", "shape"),
    [
        (25, None, 1, (46, 46)),  # 5 x 5 grid: 5 * 8 + 6
        (26, None, 1, (46, 55)),  # 5 rows of 6
        (24, None, 1, (46, 46)),  # 5 x 5 grid, last cell empty
        (10, 2, 1, (46, 19)),  # 5 rows of 2
        (25, None, 0, (40, 40)),
        (3, 10, 2, (12, 32)),  # n_cols capped at n
    ],
)
def test_tile_geometry(n, n_cols, pad, shape):
    rows = np.random.default_rng(0).normal(size=(n, 64))
    image = tile_images(rows, (8, 8), n_cols=n_cols, pad=pad)
    assert image.shape == shape and image.dtype == np.uint8


def test_tiles_placed_in_order_with_per_tile_contrast_and_black_pad():
    rng = np.random.default_rng(1)
    scales = np.logspace(-3, 3, 25)[:, None]
    rows = rng.normal(size=(25, 48)) * scales
    image = tile_images(rows, (6, 8))
    assert image.shape == (5 * 6 + 6, 5 * 8 + 6)
    for i in range(25):
        tile = _tile(image, i, 6, 8, 5).astype(float)
        t = rows[i].reshape(6, 8)
        expected = np.rint((t / np.abs(t).max() + 1) * 127.5)
        np.testing.assert_array_equal(tile, expected)
        assert tile.min() == 0 or tile.max() == 255  # own contrast, whatever the scale
    mask = np.ones(image.shape, bool)
    for i in range(25):
        r, c = divmod(i, 5)
        mask[1 + r * 7 : 1 + r * 7 + 6, 1 + c * 9 : 1 + c * 9 + 8] = False
    assert np.all(image[mask] == display.PAD_VALUE)


def test_zero_tile_is_mid_gray():
    image = tile_images(np.zeros((1, 4)), (2, 2), pad=0)
    np.testing.assert_array_equal(image, np.full((2, 2), 128))


def test_rgb_tiles_remove_mean_and_share_one_scale_over_channels():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(7, 5 * 5 * 3)) * np.arange(1, 8)[:, None] + 3.0
    image = tile_images(rows, (5, 5, 3))
    assert image.shape == (3 * 5 + 4, 3 * 5 + 4, 3) and image.dtype == np.uint8
    for i in range(7):
        tile = _tile(image, i, 5, 5, 3).astype(float)
        t = rows[i].reshape(5, 5, 3)
        t = t - t.mean()
        expected = np.rint((t / np.abs(t).max() + 1) * 127.5)
        np.testing.assert_array_equal(tile, expected)
        assert tile.min() == 0 or tile.max() == 255
    # a reddish tile stays reddish: channels are not each stretched to full range
    red = np.zeros((4, 4, 3))
    red[..., 0] = np.linspace(0, 1, 16).reshape(4, 4)
    tile = tile_images(red.reshape(1, -1), (4, 4, 3), pad=0).astype(int)
    assert np.all(tile[..., 0] >= tile[..., 1]) and np.ptp(tile[..., 1]) == 0


@pytest.mark.parametrize(
    ("rows", "shape", "match"),
    [
        (np.zeros((3, 10)), (3, 3), "rows"),
        (np.zeros((3, 16)), (4, 2, 2), "sample_shape"),
        (np.zeros((3, 4)), (4,), "sample_shape"),
        (np.full((2, 4), np.nan), (2, 2), "non-finite"),
    ],
)
def test_tile_rejects_bad_input(rows, shape, match):
    with pytest.raises(ValueError, match=match):
        tile_images(rows, shape)


# ---------------------------------------------------------------------------- PNG files
def test_save_filters_png_gray(tmp_path):
    W1 = np.random.default_rng(3).normal(size=(25, 64))
    path = save_filters_png(W1, (8, 8), tmp_path / "filters.png", scale=4)
    assert path == tmp_path / "filters.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (46 * 4, 46 * 4)
        pixels = np.asarray(im)
    # nearest-neighbour upscaling of exactly the tiled maximally activating inputs
    small = tile_images(max_activating_inputs(W1), (8, 8))
    np.testing.assert_array_equal(pixels, np.repeat(np.repeat(small, 4, 0), 4, 1))
    assert [p.name for p in tmp_path.iterdir()] == ["filters.png"]  # no temp file left


def test_save_filters_png_rgb(tmp_path):
    W1 = np.random.default_rng(4).normal(size=(10, 8 * 8 * 3))
    path = save_filters_png(W1, (8, 8, 3), tmp_path / "rgb.png", scale=2)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == ((4 * 8 + 5) * 2, (3 * 8 + 4) * 2)


def test_save_filters_png_fallback_shapes(tmp_path):
    rng = np.random.default_rng(5)
    # no shape: a perfect square becomes square tiles
    with Image.open(save_filters_png(rng.normal(size=(4, 49)), None, tmp_path / "a.png", 1)) as im:
        assert im.size == (2 * 7 + 3, 2 * 7 + 3)
    # no square: one strip per unit, stacked in a column
    with Image.open(save_filters_png(rng.normal(size=(4, 50)), None, tmp_path / "b.png", 1)) as im:
        assert im.size == (50 + 2, 4 * 1 + 5)
    # a shape that does not fit is replaced, with a warning
    with pytest.warns(UserWarning, match="sample_shape"):
        path = save_filters_png(rng.normal(size=(4, 64)), (28, 28), tmp_path / "c.png", 1)
    with Image.open(path) as im:
        assert im.size == (2 * 8 + 3, 2 * 8 + 3)


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "filters.png"
    W1 = np.random.default_rng(6).normal(size=(4, 16))
    save_filters_png(W1, (4, 4), path, scale=1)
    before = path.read_bytes()

    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_filters_png(W1 * -1, (4, 4), path, scale=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["filters.png"]
    monkeypatch.undo()
    save_filters_png(-W1, (4, 4), path, scale=1)  # overwrites an existing file
    assert path.read_bytes() != before


def test_save_images_png_uses_one_common_scale(tmp_path):
    rows = np.array([[0.0, 0.5, 1.0, 0.25], [0.0, 0.0, 0.5, 0.5]])
    path = save_images_png(rows, (2, 2), tmp_path / "im.png", pad=1, scale=3)
    with Image.open(path) as im:
        pixels = np.asarray(im)
    assert pixels.shape == ((2 + 2) * 3, (2 * 2 + 3) * 3)
    small = pixels[::3, ::3]
    np.testing.assert_array_equal(small[1:3, 1:3], [[0, 128], [255, 64]])
    np.testing.assert_array_equal(small[1:3, 4:6], [[0, 0], [128, 128]])  # not restretched
    path = save_images_png(rows, (2, 2), tmp_path / "im2.png", vmin=0.0, vmax=2.0, pad=0)
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im)[:, :2], [[0, 64], [128, 32]])


def test_save_images_png_rgb(tmp_path):
    rows = np.random.default_rng(7).random((5, 4 * 4 * 3))
    with Image.open(save_images_png(rows, (4, 4, 3), tmp_path / "rgb.png")) as im:
        assert im.mode == "RGB" and im.size == (3 * 4 + 4, 2 * 4 + 3)


def _history(n: int = 60, stages: bool = True, grad: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        entry = {"iteration": i, "cost": 50.0 * math.exp(-i / 6) + 0.01}
        if grad:
            entry["grad_norm"] = math.exp(-i / 10)
        if stages:
            entry["stage"] = "layer1" if i < n // 2 else "finetune"
        out.append(entry)
    return out


@pytest.mark.parametrize(
    ("history", "height"),
    [
        (_history(), 600),
        (_history(stages=False, grad=False), 400),
        ([{"iteration": 0, "cost": 1.0}, {"iteration": 1, "cost": float("nan")}], 400),
        ([], 400),
    ],
)
def test_save_cost_png(tmp_path, history, height):
    path = save_cost_png(history, tmp_path / "cost.png", title="job 1")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (700, height)
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # more than a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["cost.png"]


def test_cost_plot_draws_the_lines(tmp_path):
    # colour of matplotlib's first two cycle lines appear when stages are plotted
    with Image.open(save_cost_png(_history(grad=False), tmp_path / "c.png")) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])
    assert (np.abs(pixels - blue).sum(axis=1) < 30).sum() > 100
    assert (np.abs(pixels - orange).sum(axis=1) < 30).sum() > 100


def test_log_scale_only_when_costs_span_two_decades():
    assert display._use_log_scale(np.array([100.0, 50.0, 0.5]))
    assert not display._use_log_scale(np.array([100.0, 50.0, 2.0]))
    assert not display._use_log_scale(np.array([100.0, -1.0, 0.001]))
    assert not display._use_log_scale(np.array([]))


def test_cost_axis_is_logarithmic_when_costs_span_two_decades():
    fig = display._cost_figure(_history())
    cost_ax, grad_ax = fig.axes
    assert cost_ax.get_yscale() == "log" and grad_ax.get_yscale() == "log"
    assert [t.get_text() for t in cost_ax.get_legend().get_texts()] == [
        "stage layer1",
        "stage finetune",
    ]
    flat = [{"iteration": i, "cost": 2.0 + 0.1 * i} for i in range(10)]
    (ax,) = display._cost_figure(flat).axes
    assert ax.get_yscale() == "linear" and ax.get_legend() is None


def test_pictures_can_be_drawn_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def draw(i: int):
        save_cost_png(_history(20 + i), tmp_path / f"cost{i}.png")
        return save_filters_png(np.eye(16)[: i + 1], (4, 4), tmp_path / f"f{i}.png", scale=2)

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(draw, range(8)))
    for i, path in enumerate(paths):
        with Image.open(tmp_path / f"cost{i}.png") as im:
            assert im.size == (700, 600)
        with Image.open(path) as im:
            n_cols = math.ceil(math.sqrt(i + 1))
            n_rows = math.ceil((i + 1) / n_cols)
            assert im.size == ((n_cols * 5 + 1) * 2, (n_rows * 5 + 1) * 2)
