"""Ingest array files: MNIST IDX files and ``.npy`` arrays, into datasets.

Both are streamed block by block (:mod:`worker.ingest`), so a file larger than memory is never
read whole: an IDX file is decompressed as it is read, a ``.npy`` file is memory-mapped a block
of rows at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae.mnist import iter_idx
from worker.dataset import DatasetInfo, default_chunk_rows
from worker.ingest import _check_dest, _reblock, _write

__all__ = ["ingest_idx", "ingest_npy"]


# ---------------------------------------------------------------------------------------------
# MNIST IDX


def ingest_idx(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = False,
    sample_shape: Sequence[int] | None = None,
    source: str | None = None,
) -> DatasetInfo:
    """Write a dataset from an IDX file (MNIST format, gzip-compressed or raw), streaming it.

    Parameters
    ----------
    src : path
        IDX file, e.g. ``t10k-images-idx3-ubyte.gz`` (items of shape (28, 28)).
    dest : str or path
        Local path or fsspec URL of the new dataset.
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    overwrite : bool
        Replace an existing dataset at ``dest``.
    limit : int, optional
        Keep only the first ``limit`` examples.
    progress : bool
        Show a progress bar.
    sample_shape : sequence of int, optional
        Shape of one example for pictures (default: the file's item shape); its product must
        be the item's size.
    source : str, optional
        Where the data came from, for the dataset's attributes (default ``idx:<file name>``).

    Returns
    -------
    info : DatasetInfo
        Shape (m, prod(item shape)); uint8 items are stored as uint8 with scale 1/255 (values in
        [0, 1]), other item types as float32 (integers) or their float type, scale 1.
        ``sample_shape`` is the item shape, e.g. (28, 28); None for a 1-D file (one feature).
    """
    src = _existing_file(src)
    _check_dest(dest, overwrite)
    it, item_dtype, shape = _open_idx(src)
    m = shape[0] if limit is None else min(shape[0], int(limit))
    if m < 1:
        raise ValueError(f"{src}: no examples to ingest (file has {shape[0]}, limit {limit})")
    item = tuple(shape[1:])
    n = math.prod(item) if item else 1
    if sample_shape is not None:
        item = _checked_sample_shape(sample_shape, n, src, positive=True)
    dtype, scale = _idx_storage(item_dtype)
    rows = chunk_rows or default_chunk_rows(n, dtype)
    return _write(
        dest,
        _reblock(_idx_blocks(it, src, n, m), rows),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        scale=scale,
        chunk_rows=rows,
        sample_shape=item if len(item) >= 1 else None,
        preprocessing={"steps": ["scale"] if scale != 1.0 else [], "scale": scale},
        source=(source or f"idx:{src.name}") + (f" (first {m})" if m < shape[0] else ""),
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def _open_idx(src: Path) -> tuple[Generator[Any, None, None], np.dtype, tuple[int, ...]]:
    """The block iterator of an IDX file, its header read: ``(it, item dtype, shape)``."""
    it = iter_idx(src)
    try:
        item_dtype, shape = next(it)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    return it, item_dtype, shape


def _idx_storage(item_dtype: np.dtype) -> tuple[str, float]:
    """Stored dtype and scale of IDX items: uint8 with scale 1/255, else floats, scale 1."""
    if item_dtype == np.uint8:
        return "uint8", 1.0 / 255.0
    if item_dtype.kind in "iu":
        return "float32", 1.0
    return ("float64" if item_dtype.itemsize == 8 else "float32"), 1.0


def _idx_blocks(
    it: Generator[np.ndarray, None, None], src: Path, n: int, m: int
) -> Iterator[np.ndarray]:
    """The first ``m`` examples of an opened IDX file as blocks of rows of ``n`` features."""
    done = 0
    try:
        for block in it:
            block = block.reshape(block.shape[0], n)[: m - done]
            done += block.shape[0]
            yield block
            if done >= m:
                break
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    finally:
        it.close()


# ---------------------------------------------------------------------------------------------
# .npy


def ingest_npy(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    dtype: str | None = None,
    scale: float = 1.0,
    sample_shape: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    source: str | None = None,
) -> DatasetInfo:
    """Write a dataset from a ``.npy`` file of any size (memory-mapped, written chunk by chunk).

    Parameters
    ----------
    src : path
        A ``.npy`` file holding an array of shape (m, n), or (m, *sample_shape) for pictures
        (trailing dimensions are flattened into features, row-major).
    dest : str or path
        Local path or fsspec URL of the new dataset.
    dtype : {"uint8", "float32", "float64"}, optional
        Stored dtype. Default: uint8 stays uint8, float32/float64 stay, float16, bool and
        integer types become float32. Integers may be stored as uint8 only if they lie in
        [0, 255]; floats are never stored as uint8.
    scale : float
        Values are ``stored * scale`` (e.g. 1/255 for uint8 pixels).
    sample_shape : sequence of int, optional
        Shape of one example (default: the trailing dimensions of an N-D array; none for 2-D).
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    overwrite : bool
    progress : bool
    source : str, optional
        Where the data came from, for the dataset's attributes (default ``npy:<file name>``).

    Returns
    -------
    info : DatasetInfo
    """
    src = _existing_file(src)
    _check_dest(dest, overwrite)
    arr = _open_npy(src)
    m = arr.shape[0]
    item = tuple(int(d) for d in arr.shape[1:])
    n = math.prod(item)
    if m < 1 or n < 1:
        raise ValueError(f"{src}: empty array of shape {arr.shape}")
    if sample_shape is not None:
        sample_shape = _checked_sample_shape(sample_shape, n, src)
    elif len(item) > 1:
        sample_shape = item
    dtype = _npy_dtype(src, arr, dtype)
    rows = chunk_rows or default_chunk_rows(n, dtype)
    steps = ["scale"] if scale != 1.0 else []
    return _write(
        dest,
        _npy_blocks(src, arr, n, rows, dtype),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        scale=scale,
        chunk_rows=rows,
        sample_shape=sample_shape,
        preprocessing={"steps": steps, "scale": float(scale)},
        source=source or f"npy:{src.name}",
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def _open_npy(src: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped, refused unless it holds real numbers in 2 or more dims."""
    try:
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{src}: cannot be memory-mapped as a numeric array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{src}: not a readable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{src}: not a .npy array (an .npz archive?)")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{src}: dtype {arr.dtype} cannot be a dataset (need numbers, real)")
    if arr.ndim < 2:
        raise ValueError(
            f"{src}: a dataset needs a 2-D array (m examples x n features) or more; "
            f"got shape {arr.shape}"
        )
    return arr


def _npy_dtype(src: Path, arr: np.ndarray, dtype: str | None) -> str:
    """The stored dtype of ``arr``: ``dtype`` checked, or by default the one of ``arr``."""
    if dtype is None:
        if arr.dtype == np.uint8:
            dtype = "uint8"
        elif arr.dtype == np.float64:
            dtype = "float64"
        else:
            dtype = "float32"
    if dtype not in ("uint8", "float32", "float64"):
        raise ValueError(f"dtype: choose one of ['uint8', 'float32', 'float64'], got {dtype!r}")
    if dtype == "uint8" and arr.dtype.kind == "f":
        raise ValueError(f"dtype: {src} holds floats ({arr.dtype}); store them as float32/64")
    return dtype


def _npy_blocks(src: Path, arr: np.ndarray, n: int, rows: int, dtype: str) -> Iterator[np.ndarray]:
    """The rows of ``arr`` in blocks of ``rows``, as ``dtype`` (uint8: checked in [0, 255])."""
    m = arr.shape[0]
    for i in range(0, m, rows):
        block = _npy_rows(src, arr, i, min(i + rows, m)).reshape(-1, n)
        if dtype == "uint8" and arr.dtype != np.uint8:
            if block.min() < 0 or block.max() > 255:
                raise ValueError(f"{src}: values outside [0, 255] cannot be stored as uint8")
        yield block.astype(dtype, copy=False)


def _npy_rows(src: Path, arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a memory-mapped ``.npy`` array, copied out of the file.

    For a C-ordered file only those rows are mapped, and unmapped again on return, so the
    resident memory stays about one block whatever the file's size (a single map of the whole
    file would keep every page read so far resident).
    """
    offset = getattr(arr, "offset", None)
    if not arr.flags.c_contiguous or offset is None:
        return np.array(arr[start:stop])
    row_bytes = arr.dtype.itemsize * math.prod(arr.shape[1:])
    mm = np.memmap(
        src,
        dtype=arr.dtype,
        mode="r",
        offset=offset + start * row_bytes,
        shape=(stop - start, *arr.shape[1:]),
    )
    try:
        return np.array(mm)
    finally:
        del mm


# ---------------------------------------------------------------------------------------------
# checks shared by both formats


def _existing_file(src: str | os.PathLike) -> Path:
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"src: no such file {src}")
    return src


def _checked_sample_shape(
    sample_shape: Sequence[int], n: int, src: Path, positive: bool = False
) -> tuple[int, ...]:
    """``sample_shape`` as ints, refused unless it makes ``n`` values (each >= 1 if positive)."""
    shape = tuple(int(d) for d in sample_shape)
    if math.prod(shape) != n or (positive and min(shape, default=0) < 1):
        raise ValueError(
            f"sample_shape: {'x'.join(map(str, shape))} makes "
            f"{math.prod(shape)} values, but each example of {src} has {n} features"
        )
    return shape
