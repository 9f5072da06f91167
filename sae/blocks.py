"""Chunk kernels in row blocks: a chunk's rows are processed :data:`BLOCK_ROWS` at a time.

A block's activations and deltas (784-196: about 1 MB in float32) stay in the L2 cache
between the matrix products and the elementwise work on them, and each block's sums are
added to the chunk's float64 totals in row order, so the bits of a chunk's sums depend only
on the chunk and theta: never on the machine, the process or the number of workers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import numpy as np

Sums = dict[str, np.ndarray]


#: Rows per block: a constant (never read off the machine, so the bits stay the same on
#: every one), chosen by measurement: ``benchmarks/bench_objective.py --block-rows``.
BLOCK_ROWS = 1024


def row_blocks(m: int, block: int | None = None) -> list[slice]:
    """Slices of ``block`` (default :data:`BLOCK_ROWS`) consecutive rows covering ``0..m``."""
    b = BLOCK_ROWS if block is None else int(block)
    return [slice(i, min(i + b, m)) for i in range(0, m, b)] or [slice(0, 0)]


def colsum(a: np.ndarray) -> np.ndarray:
    """Column sums of a block of rows, shape (n,), in ``a``'s dtype: one matrix-vector product
    (a float32 block's sum is added to the float64 totals block by block)."""
    return np.ones(a.shape[0], a.dtype) @ a


def half_sqsum(d: np.ndarray) -> np.ndarray:
    """``1/2 sum_ij d_ij^2`` of a block as a float64 scalar (rows summed in ``d``'s dtype)."""
    return np.float64(0.5 * np.einsum("ij,ij->i", d, d).sum(dtype=np.float64))


def accumulate(total: Sums | None, part: Sums) -> Sums:
    """``total + part`` in float64, in place on ``total`` (whose arrays it owns)."""
    if total is None:
        return {k: np.array(v, dtype=np.float64) for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total


_torch = None
_pins = threading.local()


def _load_torch():
    global _torch
    if _torch is None:
        try:
            import torch
        except (ImportError, OSError) as exc:  # absent, or a broken install (a missing library)
            raise ValueError(
                "dtype: bfloat16 products need PyTorch's CPU build (pip install "
                "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu); float32 "
                f"and float64 need nothing more ({type(exc).__name__}: {exc})"
            ) from None
        import warnings

        # chunks from the cache are read-only; the products never write into their operands
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        _torch = torch
    return _torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch's products in this thread on one intra-op thread while the body runs
    (re-entrant; the engine enters it with its one-BLAS-thread pin). PyTorch's thread count
    belongs to the calling thread (OpenMP), so the pin is per thread too: the first bfloat16
    product inside it sets one thread, and the count before comes back when the outermost
    block ends. Loads nothing: a body without bfloat16 products never touches PyTorch."""
    depth = getattr(_pins, "depth", 0)
    _pins.depth = depth + 1
    try:
        yield
    finally:
        _pins.depth = depth
        restore = getattr(_pins, "restore", None)
        if depth == 0 and restore is not None:
            _pins.restore = None
            _torch.set_num_threads(restore)


def _bf16_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with both operands rounded to bfloat16, accumulated in float32 by PyTorch
    and returned as float32 (shape (a.shape[0], b.shape[1]))."""
    torch = _torch
    if getattr(_pins, "depth", 0) and getattr(_pins, "restore", None) is None:
        n = torch.get_num_threads()
        if n != 1:
            _pins.restore = n
            torch.set_num_threads(1)
    ta = torch.from_numpy(a).to(torch.bfloat16)
    tb = torch.from_numpy(b).to(torch.bfloat16)
    return (ta @ tb).to(torch.float32).numpy()


def matmul(compute) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The matrix product of a compute mode: numpy's, or bfloat16 through PyTorch (products in
    bfloat16 with float32 accumulation on the AVX-512-BF16 / AMX units, everything else in
    float32).

    Parameters
    ----------
    compute : {"float64", "float32", "bfloat16"} or numpy float type or None

    Returns
    -------
    mm : callable ``(a, b) -> a @ b``
    """
    if isinstance(compute, str) and compute == "bfloat16":
        _load_torch()
        return _bf16_matmul
    return np.matmul
