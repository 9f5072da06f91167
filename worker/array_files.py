"""Ingest array files: MNIST IDX files and ``.npy`` arrays, into datasets.

Both are streamed block by block (:mod:`worker.ingest`), so a file larger than memory is never
read whole: an IDX file is decompressed as it is read, a ``.npy`` file is memory-mapped a block
of rows at a time.

A file's header is checked before anything is allocated: the data it declares must be in the
file (a raw one: checked against its size; a gzip-compressed IDX file: as it is read), and no
chunk may hold more than ``max_chunk_bytes`` (:data:`MAX_CHUNK_BYTES`, 64 MiB): rows per chunk
are chosen to fit, and a file one example of which is larger is refused (:class:`TooLarge`).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sae.mnist import _IDX_DTYPES
from worker.dataset import DatasetInfo, check_compression, default_chunk_rows, itemsize
from worker.ingest import _check_dest, _write

__all__ = ["MAX_CHUNK_BYTES", "TooLarge", "ingest_idx", "ingest_npy"]

#: Most bytes one chunk of a dataset written from an array file may hold (stored, or as read).
MAX_CHUNK_BYTES = 64 << 20


class TooLarge(ValueError):
    """One example of a file is larger than a chunk may be (``max_chunk_bytes``)."""


def _chunk_rows(
    src: Path,
    n: int,
    dtype: str,
    read_itemsize: int,
    chunk_rows: int | None,
    max_chunk_bytes: int | None,
) -> tuple[int, int]:
    """Rows per chunk and rows per read of examples of ``n`` values stored as ``dtype``.

    The default chunk is about 16 MB (:func:`worker.dataset.default_chunk_rows`) and at most
    ``max_chunk_bytes``, as stored and as read (items of ``read_itemsize`` bytes); an explicit
    ``chunk_rows`` is kept, but read at most ``max_chunk_bytes`` at a time.

    Returns
    -------
    rows, read_rows : int

    Raises
    ------
    TooLarge
        If one example is larger than ``max_chunk_bytes``.
    """
    row_bytes = n * max(itemsize(dtype), read_itemsize)
    if max_chunk_bytes is None:
        rows = chunk_rows or default_chunk_rows(n, dtype)
        return rows, rows
    if row_bytes > max_chunk_bytes:
        raise TooLarge(
            f"{src}: one example holds {n} values ({row_bytes} bytes), more than a chunk may "
            f"hold ({max_chunk_bytes} bytes)"
        )
    fit = max(1, max_chunk_bytes // row_bytes)
    rows = chunk_rows or min(default_chunk_rows(n, dtype), fit)
    return rows, min(rows, fit)


# ---------------------------------------------------------------------------------------------
# MNIST IDX


def ingest_idx(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    chunk_rows: int | None = None,
    compression: str = "auto",
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = False,
    sample_shape: Sequence[int] | None = None,
    source: str | None = None,
    max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
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
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
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
    max_chunk_bytes : int or None
        Most bytes of one chunk, stored or read (default 64 MiB; None: no limit).

    Returns
    -------
    info : DatasetInfo
        Shape (m, prod(item shape)); uint8 items are stored as uint8 with scale 1/255 (values in
        [0, 1]), other item types as float32 (integers) or their float type, scale 1.
        ``sample_shape`` is the item shape, e.g. (28, 28); None for a 1-D file (one feature).

    Raises
    ------
    ValueError
        For a malformed or truncated file (a header declaring more data than the file holds).
    TooLarge
        If one example is larger than ``max_chunk_bytes``.
    """
    check_compression(compression)
    src = _existing_file(src)
    _check_dest(dest, overwrite)
    f, item_dtype, shape, held = _open_idx(src)
    try:
        m = shape[0] if limit is None else min(shape[0], int(limit))
        if m < 1:
            raise ValueError(f"{src}: no examples to ingest (file has {shape[0]}, limit {limit})")
        item = tuple(shape[1:])
        n = math.prod(item) if item else 1
        if n < 1:
            raise ValueError(f"{src}: IDX items of shape {item} hold no values")
        if held is not None and m * n * item_dtype.itemsize > held:
            raise ValueError(
                f"{src}: IDX file is truncated: its header declares {m} items of shape "
                f"{item} ({m * n * item_dtype.itemsize} bytes), the file holds {held} bytes "
                "after its header"
            )
        if sample_shape is not None:
            item = _checked_sample_shape(sample_shape, n, src, positive=True)
        dtype, scale = _idx_storage(item_dtype)
        rows, read_rows = _chunk_rows(
            src, n, dtype, item_dtype.itemsize, chunk_rows, max_chunk_bytes
        )
        return _write(
            dest,
            _idx_blocks(f, src, item_dtype, n, m, read_rows),
            n_rows=m,
            n_features=n,
            dtype=dtype,
            scale=scale,
            chunk_rows=rows,
            compression=compression,
            sample_shape=item if len(item) >= 1 else None,
            preprocessing={"steps": ["scale"] if scale != 1.0 else [], "scale": scale},
            source=(source or f"idx:{src.name}") + (f" (first {m})" if m < shape[0] else ""),
            overwrite=overwrite,
            what=str(src),
            progress=progress,
        )
    finally:
        f.close()


def _open_idx(src: Path) -> tuple[BinaryIO, np.dtype, tuple[int, ...], int | None]:
    """An IDX file (gzip or raw) open past its header: ``(f, item dtype, shape, held)``.

    ``held`` is the number of bytes after the header of a raw file (None for a gzip-compressed
    one, whose size is known only once read); nothing the header declares is allocated here.
    """
    with open(src, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    f = gzip.open(src, "rb") if gz else open(src, "rb")
    try:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise ValueError(f"{src}: not an IDX file (bad magic number)")
        ndim = head[3]
        if ndim < 1:
            raise ValueError(f"{src}: IDX file with no dimensions")
        dims = f.read(4 * ndim)
        if len(dims) != 4 * ndim:
            raise ValueError(
                f"{src}: IDX header too short: {ndim} dimensions need {4 + 4 * ndim} bytes, "
                f"the file has {4 + len(dims)}"
            )
        held = None if gz else os.fstat(f.fileno()).st_size - (4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as exc:
        f.close()
        raise ValueError(f"{src}: cannot read the IDX file ({exc})") from None
    except BaseException:
        f.close()
        raise
    shape = tuple(int(d) for d in struct.unpack(f">{ndim}I", dims))
    return f, np.dtype(_IDX_DTYPES[head[2]]), shape, held


def _idx_storage(item_dtype: np.dtype) -> tuple[str, float]:
    """Stored dtype and scale of IDX items: uint8 with scale 1/255, else floats, scale 1."""
    if item_dtype == np.uint8:
        return "uint8", 1.0 / 255.0
    if item_dtype.kind in "iu":
        return "float32", 1.0
    return ("float64" if item_dtype.itemsize == 8 else "float32"), 1.0


def _idx_blocks(
    f: BinaryIO, src: Path, item_dtype: np.dtype, n: int, m: int, rows: int
) -> Iterator[np.ndarray]:
    """The first ``m`` examples of an IDX file open past its header, read ``rows`` at a time
    (never more), as blocks of rows of ``n`` features in native byte order."""
    row_bytes = n * item_dtype.itemsize
    native = item_dtype.newbyteorder("=")
    done = 0
    try:
        while done < m:
            k = min(rows, m - done)
            buf = f.read(k * row_bytes)
            if len(buf) != k * row_bytes:
                raise ValueError(
                    f"{src}: IDX file is truncated (it holds {done + len(buf) // row_bytes} "
                    f"of the {m} examples its header declares)"
                )
            yield np.frombuffer(buf, dtype=item_dtype).reshape(k, n).astype(native, copy=False)
            done += k
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{src}: cannot read the IDX file ({exc})") from None


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
    compression: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    source: str | None = None,
    max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
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
        Stored dtype. Default: uint8 stays uint8, float32/float64 stay (in either byte order;
        floats of more than 8 bytes become float64), float16, bool and integer types become
        float32. Integers may be stored as uint8 only if they lie in [0, 255]; floats are
        never stored as uint8.
    scale : float
        Values are ``stored * scale`` (e.g. 1/255 for uint8 pixels).
    sample_shape : sequence of int, optional
        Shape of one example (default: the trailing dimensions of an N-D array; none for 2-D).
    chunk_rows : int, optional
        Rows per chunk (default: about 16 MB per chunk).
    compression : {"auto", "zstd", "none"}
        Codec of the chunks (:func:`worker.dataset.compressors`): ``"auto"`` compresses uint8
        pixels and leaves floats raw, which read several times faster than Zstandard ones.
    overwrite : bool
    progress : bool
    source : str, optional
        Where the data came from, for the dataset's attributes (default ``npy:<file name>``).
    max_chunk_bytes : int or None
        Most bytes of one chunk, stored or read (default 64 MiB; None: no limit).

    Returns
    -------
    info : DatasetInfo

    Raises
    ------
    ValueError
        For a malformed file (a header declaring more data than the file holds), or an array
        that cannot be a dataset.
    TooLarge
        If one example is larger than ``max_chunk_bytes``.
    """
    check_compression(compression)
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
    rows, read_rows = _chunk_rows(src, n, dtype, arr.dtype.itemsize, chunk_rows, max_chunk_bytes)
    steps = ["scale"] if scale != 1.0 else []
    return _write(
        dest,
        _npy_blocks(src, arr, n, read_rows, dtype),
        n_rows=m,
        n_features=n,
        dtype=dtype,
        scale=scale,
        chunk_rows=rows,
        compression=compression,
        sample_shape=sample_shape,
        preprocessing={"steps": steps, "scale": float(scale)},
        source=source or f"npy:{src.name}",
        overwrite=overwrite,
        what=str(src),
        progress=progress,
    )


def _check_npy_header(src: Path) -> None:
    """Refuse a ``.npy`` file whose header declares more data than the file holds, before
    anything is mapped or allocated (numpy refuses versions other than 1, 2 and 3; version 3
    is version 2 with a UTF-8 header, which only names fields, never numbers)."""
    fmt = np.lib.format
    with open(src, "rb") as f:
        version = fmt.read_magic(f)
        read = {
            (1, 0): fmt.read_array_header_1_0,
            (2, 0): fmt.read_array_header_2_0,
            (3, 0): fmt.read_array_header_2_0,
        }
        if version not in read:
            return
        shape, _, descr = read[version](f)
        held = os.fstat(f.fileno()).st_size - f.tell()
    declared = math.prod(shape) * descr.itemsize
    if declared > held:
        raise ValueError(
            f"{src}: the .npy header declares an array of shape {shape} of {descr} "
            f"({declared} bytes), but the file holds {held} bytes after its header"
        )


def _open_npy(src: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped, refused unless it holds real numbers in 2 or more dims."""
    try:
        _check_npy_header(src)
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{src}: not a readable .npy file ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's header parser lets through what it meets
        if isinstance(exc, ValueError) and str(exc).startswith(f"{src}: "):
            raise  # the header's own check
        raise ValueError(f"{src}: cannot be memory-mapped as a numeric array ({exc})") from None
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
    if dtype is None:  # by kind and size: a big-endian >f8 is float64 too
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 1:
            dtype = "uint8"
        elif arr.dtype.kind == "f" and arr.dtype.itemsize >= 8:
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
