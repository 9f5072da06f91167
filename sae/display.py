"""Pictures of a trained autoencoder: filter grids, image grids, the cost curve, as PNG files.

- :func:`max_activating_inputs` - the input of norm 1 that maximally activates each hidden unit
  (notes, section 4): ``x_j = W1[j, :] / ||W1[j, :]||``.
- :func:`tile_images` - rows as tiles of a near-square grid, each tile scaled to its own
  contrast (as UFLDL's ``display_network``), as a uint8 image.
- :func:`save_filters_png`, :func:`save_images_png`, :func:`save_cost_png`,
  :func:`save_density_png` (the latents' firing frequencies) - PNG files written atomically
  (a temporary file in the same directory, then ``os.replace``), so a reader such as a web
  server never sees half a file.

Plots use ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so they are safe to
draw from the threads of a server.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sae.atomic import atomic_write

#: Value of the pad pixels between tiles and of empty grid cells (black, as UFLDL).
PAD_VALUE = 0


# ---------------------------------------------------------------------------- arrays
def max_activating_inputs(W1: np.ndarray) -> np.ndarray:
    """The norm-bounded input that maximally activates each hidden unit.

    Over ``||x||^2 <= 1``, unit j's input ``W1[j, :] x`` is largest at
    ``x_j = W1[j, :] / sqrt(sum_i W1[j, i]^2)`` (notes, section 4). A row of zeros gives a row of
    zeros (every input activates that unit equally).

    Parameters
    ----------
    W1 : ndarray of shape (hidden, visible)

    Returns
    -------
    X : ndarray of shape (hidden, visible), float64
        Rows of unit norm (or zero).
    """
    W1 = np.asarray(W1, dtype=np.float64)
    if W1.ndim != 2:
        raise ValueError(f"W1: expected shape (hidden, visible), got {W1.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", W1, W1))
    safe = np.where(norms > 0, norms, 1.0)
    return W1 / safe[:, None]


def _check_rows(rows: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[None, :]
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ValueError(
            f"sample_shape: expected (h, w) for grayscale or (h, w, 3) for RGB, got {shape}"
        )
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != math.prod(shape):
        raise ValueError(
            f"rows: expected shape (n, {math.prod(shape)}) for samples of shape {shape}, "
            f"got {rows.shape}"
        )
    if not np.all(np.isfinite(rows)):
        raise ValueError("rows: contain non-finite values")
    return rows


def _grid(tiles: np.ndarray, n_cols: int | None, pad: int, fill: float = PAD_VALUE) -> np.ndarray:
    """Arrange tiles of shape (n, h, w[, c]) on a grid with ``pad`` pixels around every tile."""
    n, h, w = tiles.shape[:3]
    if n_cols is None:
        n_cols = math.ceil(math.sqrt(n))
    if isinstance(n_cols, bool) or int(n_cols) != n_cols or n_cols < 1:
        raise ValueError(f"n_cols: must be a positive integer, got {n_cols!r}")
    if isinstance(pad, bool) or int(pad) != pad or pad < 0:
        raise ValueError(f"pad: must be an integer >= 0, got {pad!r}")
    n_cols, pad = min(int(n_cols), n), int(pad)
    n_rows = math.ceil(n / n_cols)
    H, W = n_rows * h + (n_rows + 1) * pad, n_cols * w + (n_cols + 1) * pad
    out = np.full((H, W) + tiles.shape[3:], fill, dtype=tiles.dtype)
    for i in range(n):
        r, c = divmod(i, n_cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top : top + h, left : left + w] = tiles[i]
    return out


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to [0, 255], rounding to nearest."""
    return np.rint((np.clip(unit, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def tile_images(
    rows: np.ndarray,
    sample_shape: tuple[int, ...],
    n_cols: int | None = None,
    pad: int = 1,
) -> np.ndarray:
    """Rows as tiles of a near-square grid, each tile at its own contrast.

    Row i is reshaped in C order to ``sample_shape`` (the layout of
    :func:`sae.preprocess.sample_patches`) and placed at grid row ``i // n_cols``, column
    ``i % n_cols``.

    Contrast per tile, as UFLDL's ``display_network`` / ``displayColorNetwork``:

    - grayscale (``(h, w)`` or ``(h, w, 1)``): ``t / max|t|`` mapped from [-1, 1] to
      [0, 255] (0 stays mid-gray 128);
    - RGB: the tile's mean over all pixels and channels is removed, then the tile is divided by
      its largest absolute value over all channels, so its colours keep their balance (UFLDL
      divides each channel by its own maximum, which shifts hues).

    Either way each tile's most extreme pixel is 0 or 255. An all-zero (or, for RGB, constant)
    tile is drawn mid-gray. Pad pixels and empty cells of the last grid row are black
    (:data:`PAD_VALUE`).

    Parameters
    ----------
    rows : ndarray of shape (n, prod(sample_shape))
    sample_shape : tuple of int
        ``(h, w)`` for grayscale or ``(h, w, 3)`` for RGB.
    n_cols : int, optional
        Columns of the grid (at most n); default ``ceil(sqrt(n))``, with ``ceil(n / n_cols)``
        rows.
    pad : int
        Pixels between tiles and around the grid.

    Returns
    -------
    image : ndarray of shape (H, W) or (H, W, 3), uint8
        ``H = n_rows * h + (n_rows + 1) * pad``, ``W = n_cols * w + (n_cols + 1) * pad``.
    """
    rows = _check_rows(rows, sample_shape)
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 3 and shape[2] == 1:  # one channel: grayscale contrast (mean kept)
        shape = shape[:2]
    tiles = rows.reshape((rows.shape[0],) + shape)
    axes = tuple(range(1, tiles.ndim))
    if tiles.ndim == 4:
        tiles = tiles - tiles.mean(axis=axes, keepdims=True)
    peak = np.abs(tiles).max(axis=axes, keepdims=True)
    unit = tiles / np.where(peak > 0, peak, 1.0)
    return _grid(_to_uint8(unit), n_cols, pad)


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale: must be a positive integer, got {scale!r}")
    scale = int(scale)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


# ---------------------------------------------------------------------------- files
def _save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    pil = Image.fromarray(np.ascontiguousarray(image))
    return atomic_write(path, lambda f: pil.save(f, format="PNG"))


def _filter_shape(visible: int, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``sample_shape`` if it fits ``visible`` values, else a square ``(s, s)``, else a strip."""
    if sample_shape is not None:
        shape = tuple(int(s) for s in sample_shape)
        if math.prod(shape) == visible and (
            len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))
        ):
            return shape
        warnings.warn(
            f"sample_shape {shape} does not describe {visible} inputs as (h, w) or (h, w, 3); "
            "drawing the filters as squares or strips instead",
            stacklevel=3,
        )
    s = math.isqrt(visible)
    if s * s == visible:
        return (s, s)
    return (1, visible)


def save_filters_png(
    W1: np.ndarray,
    sample_shape: Sequence[int] | None,
    path: str | os.PathLike,
    scale: int = 4,
) -> Path:
    """Write the grid of maximally activating inputs of the hidden units as a PNG.

    Each hidden unit j is drawn as ``max_activating_inputs(W1)[j]`` reshaped to
    ``sample_shape`` by :func:`tile_images` (per-tile contrast, black 1-pixel borders), then
    the whole picture is enlarged ``scale`` times by nearest neighbour.

    If ``sample_shape`` is None or does not hold ``visible`` values as ``(h, w)`` or
    ``(h, w, 3)`` (a warning is issued for a given but unusable shape), each filter is drawn as
    an ``(s, s)`` square when ``visible = s * s``, and otherwise as a ``(1, visible)`` strip,
    the strips stacked in one column.

    Parameters
    ----------
    W1 : ndarray of shape (hidden, visible)
    sample_shape : tuple of int or None
        ``(h, w)`` or ``(h, w, 3)`` with ``h * w [* 3] = visible``.
    path : str or PathLike
        Destination; its directory must exist. Written atomically.
    scale : int
        Nearest-neighbour enlargement factor ``>= 1``.

    Returns
    -------
    path : Path
    """
    X = max_activating_inputs(W1)
    shape = _filter_shape(X.shape[1], sample_shape)
    n_cols = 1 if shape[0] == 1 and shape[1] > 1 else None  # strips stack in one column
    image = tile_images(X, shape, n_cols=n_cols, pad=1)
    return _save_png(_upscale(image, scale), path)


def save_images_png(
    rows: np.ndarray,
    sample_shape: Sequence[int],
    path: str | os.PathLike,
    n_cols: int | None = None,
    pad: int = 1,
    scale: int = 1,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write rows (digits, patches, reconstructions) as a PNG grid on one common scale.

    Unlike :func:`tile_images` there is no per-tile contrast: every value is mapped linearly
    from ``[vmin, vmax]`` to [0, 255] (clipped), so that, for example, inputs and their
    reconstructions can be compared pixel for pixel. Pad pixels are black.

    Parameters
    ----------
    rows : ndarray of shape (n, prod(sample_shape))
    sample_shape : tuple of int
        ``(h, w)`` or ``(h, w, 3)``.
    path : str or PathLike
        Destination; written atomically.
    n_cols : int, optional
        Columns of the grid; default ``ceil(sqrt(n))``.
    pad : int
        Pixels between tiles and around the grid.
    scale : int
        Nearest-neighbour enlargement factor ``>= 1``.
    vmin, vmax : float, optional
        Values drawn black and white; default the minimum and maximum of ``rows``.

    Returns
    -------
    path : Path
    """
    rows = _check_rows(rows, tuple(sample_shape))
    lo = float(rows.min()) if vmin is None else float(vmin)
    hi = float(rows.max()) if vmax is None else float(vmax)
    if not hi > lo:
        hi = lo + 1.0
    unit = (rows - lo) / (hi - lo) * 2.0 - 1.0
    tiles = _to_uint8(unit).reshape((rows.shape[0],) + tuple(int(s) for s in sample_shape))
    if tiles.ndim == 4 and tiles.shape[3] == 1:
        tiles = tiles[..., 0]
    return _save_png(_upscale(_grid(tiles, n_cols, pad), scale), path)


# ---------------------------------------------------------------------------- cost curve
def _use_log_scale(values: np.ndarray) -> bool:
    """True if all values are positive and span more than two decades."""
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() <= 0:
        return False
    return bool(values.max() / values.min() > 100.0)


def _series(history: Sequence[dict], key: str) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """(stage, iterations, values) per stage, in order of first appearance, finite values only."""
    groups: dict[str | None, tuple[list[float], list[float]]] = {}
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is None:
            continue
        stage = entry.get("stage")
        stage = None if stage is None else str(stage)
        its, vals = groups.setdefault(stage, ([], []))
        its.append(float(entry.get("iteration", i)))
        vals.append(float(value))
    out = []
    for stage, (its, vals) in groups.items():
        x, y = np.asarray(its), np.asarray(vals)
        ok = np.isfinite(y)
        out.append((stage, x[ok], y[ok]))
    return out


def save_cost_png(
    history: Sequence[dict], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Plot cost against iteration (and the gradient norm, if recorded) as a PNG.

    One line per ``"stage"`` (labelled in a legend) when entries carry a stage. If any entry
    has ``"grad_norm"``, a second panel below shows it on a log scale. The cost axis is
    logarithmic when all costs are positive and span more than two decades. Non-finite values
    are left out; an empty history gives an empty plot saying so.

    Parameters
    ----------
    history : sequence of dict
        Entries with ``"iteration"`` (int) and ``"cost"`` (float), optionally ``"grad_norm"``
        (float) and ``"stage"`` (str or int).
    path : str or PathLike
        Destination; written atomically.
    title : str, optional
        Title above the plot.

    Returns
    -------
    path : Path
    """
    fig = _cost_figure(history, title)
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _cost_figure(history: Sequence[dict], title: str | None = None):
    """The matplotlib Figure (Agg canvas) drawn by :func:`save_cost_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cost = _series(history, "cost")
    grad = _series(history, "grad_norm")
    has_grad = any(y.size for _, _, y in grad)
    fig = Figure(figsize=(7.0, 6.0 if has_grad else 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True) if has_grad else [fig.subplots()]
    ax = axes[0]
    staged = any(stage is not None for stage, _, _ in cost)
    for stage, x, y in cost:
        ax.plot(x, y, marker="." if x.size < 50 else None, label=f"stage {stage}")
    ax.set_ylabel("cost")
    all_costs = np.concatenate([y for _, _, y in cost]) if cost else np.empty(0)
    if _use_log_scale(all_costs):
        ax.set_yscale("log")
    if all_costs.size == 0:
        ax.text(0.5, 0.5, "no iterations yet", ha="center", va="center", transform=ax.transAxes)
    if staged:
        ax.legend(loc="upper right")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if has_grad:
        gax = axes[1]
        for stage, x, y in grad:
            y_pos = y > 0
            gax.plot(x[y_pos], y[y_pos], label=f"stage {stage}")
        gax.set_yscale("log")
        gax.set_ylabel("gradient norm")
        gax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration")
    return fig


# ---------------------------------------------------------------------------- feature density
def save_density_png(
    density: np.ndarray,
    path: str | os.PathLike,
    examples: int | None = None,
    title: str | None = None,
) -> Path:
    """Plot the histogram of the latents' log10 firing frequencies as a PNG.

    The bins are :func:`sae.metrics.density_histogram`'s (an eighth of a decade each, up to
    10^0 = active on every example); the latents never active (density 0, whose log is
    -inf) are a separate red bar at the left, labelled "dead" with their count.

    Parameters
    ----------
    density : ndarray of shape (h,)
        Fraction of the examples each latent is active on, in [0, 1].
    path : str or PathLike
        Destination; written atomically.
    examples : int, optional
        Examples the density was measured on (the rarest possible frequency is 1 / examples).
    title : str, optional
        Title above the plot (default: latents, dead latents and examples).

    Returns
    -------
    path : Path
    """
    fig = _density_figure(density, examples, title)
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _density_figure(density: np.ndarray, examples: int | None = None, title: str | None = None):
    """The matplotlib Figure (Agg canvas) drawn by :func:`save_density_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from sae.metrics import density_histogram

    density = np.asarray(density, dtype=np.float64).ravel()
    if density.size == 0 or not np.all(np.isfinite(density)):
        raise ValueError("density: expected a finite frequency per latent")
    hist = density_histogram(density, examples)
    edges, counts, dead = np.asarray(hist["log10_edges"]), hist["counts"], hist["dead"]
    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_dead, ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 8]})
    ax_dead.bar([0], [dead], width=0.6, color="#d62728")
    ax_dead.set_xticks([0], ["dead"])
    ax_dead.set_xlim(-0.6, 0.6)
    ax_dead.annotate(
        str(dead), (0, dead), ha="center", va="bottom", xytext=(0, 2), textcoords="offset points"
    )
    ax_dead.set_ylabel("latents")
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#1f77b4")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("log10 firing frequency (fraction of examples a latent is active on)")
    for a in (ax_dead, ax):
        a.grid(True, axis="y", alpha=0.3)
    top = max([dead, *counts, 1])
    ax.set_ylim(0, top * 1.12)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if title is None:
        seen = f", {examples} examples" if examples else ""
        title = f"Feature density: {density.size} latents, {dead} dead{seen}"
    fig.suptitle(title)
    return fig
