"""Arrays handed to BLAS: one layout and one alignment, whatever process made them.

The engine promises bitwise the same sums for the same chunk and theta in any process. A
matrix product's last bits depend on more than the values of its operands:

- **Alignment.** An array deserialised from a Dask message can be a view into the message
  frame at any byte offset (theta has been seen at an address of 7 mod 8 on a worker). NumPy
  does not give BLAS an operand that is not aligned to its item size: it copies it first, and
  the copy is C-contiguous whatever the view was. ``X @ W.T`` with such a ``W`` then calls
  GEMM as ``NN`` where the aligned case calls ``NT``.
- **Layout.** OpenBLAS's SkylakeX (AVX-512) kernels compute small products (``M*N*K`` up to
  about 10**6) with "small-matrix" kernels, one per transpose case, which add the ``K``
  products in different orders: ``NN`` and ``NT`` differ in the last bit. The Haswell kernel
  packs its operands first and gives the same bits for every case, which is why the bug
  showed only on AVX-512 machines.
- **Reductions.** ``np.sum`` of an unaligned vector goes through NumPy's casting buffer,
  which changes the blocks of its pairwise sum (different bits on every kernel).

So every array that reaches a product or a reduction in :mod:`sae.objective` passes through
:func:`blas_ready` first: C-contiguous and aligned to its item size, copied only when it is
not (theta is small; a chunk decoded by the engine is already both). The transposes the
math takes (``W.T``, ``delta.T``) are views of such arrays, so each product always sees one
layout. Alignment beyond the item size (e.g. 64 bytes) does not change the bits of the
kernels we test (OpenBLAS 0.3.31, SkylakeX and Haswell: ``tests/test_reproducibility.py``).
"""

from __future__ import annotations

import numpy as np

#: What :func:`blas_ready` guarantees.
REQUIREMENTS = ("C_CONTIGUOUS", "ALIGNED")


def blas_ready(a, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous array aligned to its item size (a copy only if needed).

    Parameters
    ----------
    a : array_like
    dtype : numpy dtype, optional
        Convert to this dtype (default: keep ``a``'s).

    Returns
    -------
    out : ndarray of ``a``'s shape, C-contiguous, ``out.flags.aligned`` true
    """
    return np.require(a, dtype=dtype, requirements=REQUIREMENTS)
