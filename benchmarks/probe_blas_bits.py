"""Which BLAS inputs besides the values change a result's bits, on this machine's kernel.

Prints, for the kernel OpenBLAS picked (run it also with ``OPENBLAS_CORETYPE=Haswell``), whether
the same product or sum gives other bits when

1. an operand is a transposed view of an array at an odd byte offset (as theta deserialised
   from a Dask message can be): NumPy copies it to C order first, so BLAS sees ``NN`` instead
   of ``NT``;
2. an operand is at another item-aligned offset (0, 8, ..., 56 bytes past 64);
3. BLAS runs 2 threads instead of 1;
4. ``np.sum`` reads a vector at an odd offset (NumPy's casting buffer reblocks its pairwise sum);

and then whether the engine's chunk sums (:func:`sae.objective.pass2`) are the same bits under
all of these, which is what :func:`sae.blas.blas_ready` and :func:`worker.threads.one_blas_thread`
fix. Seen on OpenBLAS 0.3.31: SkylakeX differs in 1 (products with M*N*K <= 1e6) and 3, the
Haswell kernel in neither; both differ in 4; neither in 2.

    python benchmarks/probe_blas_bits.py
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A C-ordered copy of ``a`` starting ``offset`` bytes after a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main() -> None:
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    for lib in blas:
        print(f"BLAS: {lib['internal_api']} {lib['version']}, kernel {lib.get('architecture')}")
    rng = np.random.default_rng(0)
    print("\n(m, k, n)          odd-offset W.T   aligned offsets   2 threads")
    for m, k, n in [(170, 36, 10), (36, 170, 10), (48, 400, 64), (400, 64, 48), (2048, 784, 196)]:
        A = rng.random((m, k))
        W = rng.random((n, k))  # A @ W.T, as the forward pass multiplies by W_l^T
        ref = A @ W.T
        odd = not np.array_equal(A @ at_offset(W, 3).T, ref)
        offs = any(not np.array_equal(A @ at_offset(W, o).T, ref) for o in range(8, 64, 8))
        D = rng.random((k, m))  # delta.T @ A, as the gradient sums
        B = rng.random((k, n))
        with threadpool_limits(1, user_api="blas"):
            one = D.T @ B
        with threadpool_limits(2, user_api="blas"):
            two = D.T @ B
        threads = not np.array_equal(one, two)
        print(f"{(m, k, n)!s:18} {_yn(odd):16} {_yn(offs):17} {_yn(threads)}")
    v = rng.standard_normal(100_000)
    odd_sum = np.sum(at_offset(v, 3)) != np.sum(v)
    print(f"\nnp.sum of 100,000 values at an odd offset differs: {_yn(odd_sum)}")

    from sae import objective as obj
    from sae.network import Network

    net = Network.autoencoder(36, 10, lam=1e-3, rho=0.05, beta=2.0)
    theta, X = net.init_theta(1), rng.random((170, 36))
    rh = obj.rho_hat(net, obj.pass1(net, theta, X))

    def bits(th, threads: int) -> bytes:
        with threadpool_limits(threads, user_api="blas"):
            return b"".join(v.tobytes() for v in obj.pass2(net, th, X, rh).values())

    same = bits(theta, 1) == bits(at_offset(theta, 3), 1)
    print(f"sae.objective.pass2 with theta at an odd offset, same bits: {_yn(same)}")

    from worker.chunks import evaluate_chunks

    net = Network.autoencoder(64, 48, lam=1e-3, rho=0.05, beta=1.0)
    theta, X = net.init_theta(2), rng.random((400, 64))
    grads = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            grads.append(evaluate_chunks(net, theta, lambda: [(X, None)], "two", "float64", 400)[1])
    print(
        "worker.chunks.evaluate_chunks (64-48, 400 rows) in a 1- and a 2-thread process, "
        f"same bits: {_yn(np.array_equal(*grads))}"
    )


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    main()
