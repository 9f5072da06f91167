"""Reader for the MNIST IDX format (gzip-compressed or raw)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: str | os.PathLike) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx_header(f: BinaryIO) -> tuple[np.dtype, tuple[int, ...]]:
    """Read an IDX header from an open binary stream.

    Returns
    -------
    dtype : numpy dtype of the items
    shape : tuple of int
    """
    head = f.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise ValueError("file: not an IDX file (bad magic number)")
    ndim = head[3]
    if ndim < 1:
        raise ValueError("file: IDX file with no dimensions")
    dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    return np.dtype(_IDX_DTYPES[head[2]]), tuple(int(d) for d in dims)


def iter_idx(path: str | os.PathLike, rows_per_block: int = 4096):
    """Stream an IDX file in blocks of examples without reading it whole.

    Yields
    ------
    dtype, shape : first, the header
    block : ndarray of shape (k, *shape[1:]) afterwards
    """
    with _open(path) as f:
        dtype, shape = read_idx_header(f)
        yield dtype, shape
        per = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        left = shape[0]
        while left:
            k = min(rows_per_block, left)
            buf = f.read(k * per * dtype.itemsize)
            if len(buf) != k * per * dtype.itemsize:
                raise ValueError("file: IDX file is truncated")
            yield (
                np.frombuffer(buf, dtype=dtype)
                .reshape((k, *shape[1:]))
                .astype(dtype.newbyteorder("="), copy=False)
            )
            left -= k


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a whole IDX file (gzip or raw).

    Returns
    -------
    data : ndarray of the file's shape, e.g. (10000, 28, 28) uint8 for MNIST images
    """
    it = iter_idx(path)
    _, shape = next(it)
    blocks = list(it)
    return np.concatenate(blocks).reshape(shape) if blocks else np.empty(shape)


def mnist_images(folder: str | os.PathLike, kind: str = "t10k") -> np.ndarray:
    """MNIST images scaled to [0, 1] as rows, like the UFLDL exercises.

    Returns
    -------
    X : ndarray of shape (n_images, 784), float64
    """
    path = Path(folder) / f"{kind}-images-idx3-ubyte.gz"
    if not path.exists():
        path = Path(folder) / f"{kind}-images-idx3-ubyte"
    images = load_idx(path)
    return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


def mnist_labels(folder: str | os.PathLike, kind: str = "t10k") -> np.ndarray:
    """MNIST labels, shape (n_images,), uint8."""
    path = Path(folder) / f"{kind}-labels-idx1-ubyte.gz"
    if not path.exists():
        path = Path(folder) / f"{kind}-labels-idx1-ubyte"
    return load_idx(path)
