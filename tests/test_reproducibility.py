"""Same bits wherever the sums are computed: any alignment or layout of the inputs, any BLAS
thread count of the process, any worker.

These failed on OpenBLAS's SkylakeX (AVX-512) kernel before the engine fixed layout and threads
(issue 14): theta deserialised on a worker is a view at an odd byte offset, NumPy copies such an
operand to C order before calling BLAS, and the small-matrix kernels of SkylakeX add the ``NN``
and ``NT`` cases in different orders; a 2-thread BLAS splits some products differently too. On
the Haswell kernel they passed either way, so ``.ci/run`` runs them under both kernels.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_limits

from sae import objective as obj
from sae.blas import blas_ready
from sae.network import Network
from worker.chunks import (
    ChunkSource,
    _chunk_fused,
    _chunk_pass1,
    _chunk_pass2,
    _finalize_one,
)
from worker.dataset import open_dataset, write_dataset
from worker.threads import blas_threads, one_blas_thread

pytestmark = pytest.mark.bitwise

#: Byte offsets from a 64-byte boundary: item-aligned ones, and odd ones like those of a view
#: into a Dask message frame.
OFFSETS = (0, 8, 16, 24, 32, 40, 48, 56, 1, 3, 7, 55)


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` (C order) whose data starts ``offset`` bytes after a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset and np.array_equal(out, a)
    return out


def _bits(sums: dict) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in sums.items()}


#: (visible, hidden, rows): products below OpenBLAS's small-matrix limit (M*N*K <= 1e6), one
#: above it, and the shape whose W gradient a 2-thread BLAS split differently.
SHAPES = [(36, 10, 170), (64, 48, 400), (100, 30, 257)]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def problem(request):
    n, h, m = request.param
    net = Network.autoencoder(n, h, lam=1e-3, rho=0.05, beta=2.0)
    rng = np.random.default_rng(n + h + m)
    X = rng.random((m, n))
    theta = net.init_theta(3)
    theta[net.layout[-2].start :] = rng.normal(0, 0.1, net.n_params - net.layout[-2].start)
    return net, theta, X


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_chunk_sums_do_not_depend_on_alignment_or_layout(problem, dtype):
    net, theta, X = problem
    rh = obj.rho_hat(net, obj.pass1(net, theta, X, dtype=dtype))

    def all_sums(th, X_):
        return {
            "forward": _bits(dict(enumerate(obj.forward(net, th, X_, dtype=dtype)))),
            "pass1": _bits(obj.pass1(net, th, X_, dtype=dtype)),
            "pass2": _bits(obj.pass2(net, th, X_, rh, dtype=dtype)),
            "fused": _bits(obj.fused(net, th, X_, dtype=dtype)),
            "finalize": obj.finalize(net, th, obj.fused(net, th, X_, dtype=dtype))[1].tobytes(),
        }

    ref = all_sums(at_offset(theta, 0), at_offset(X, 0))
    for off in OFFSETS:
        assert all_sums(at_offset(theta, off), X) == ref, f"theta at byte offset {off}"
        assert all_sums(theta, at_offset(X, off)) == ref, f"X at byte offset {off}"
    # Layouts: a Fortran-ordered X, theta as a strided view.
    assert all_sums(theta, np.asfortranarray(X)) == ref
    wide = np.zeros(2 * theta.size)
    wide[::2] = theta
    assert all_sums(wide[::2], X) == ref


def test_targets_do_not_depend_on_alignment():
    enc = Network(sizes=(20, 12), activations=("sigmoid",))
    net = Network.autoencoder(12, 6, lam=1e-3, rho=0.1, beta=1.0, output_size=20)
    rng = np.random.default_rng(5)
    Y = rng.random((300, 20))
    H = obj.forward(enc, enc.init_theta(1), Y)[-1]
    theta = net.init_theta(2)
    ref = _bits(obj.fused(net, theta, H, Y=Y))
    for off in OFFSETS:
        assert _bits(obj.fused(net, theta, H, Y=at_offset(Y, off))) == ref
        assert _bits(obj.fused(net, at_offset(theta, off), at_offset(H, off), Y=Y)) == ref


def test_blas_ready_copies_only_what_it_must():
    a = np.arange(12.0).reshape(3, 4)
    assert blas_ready(a) is a
    odd = at_offset(a, 3)
    assert not odd.flags.aligned
    out = blas_ready(odd)
    assert out.flags.aligned and out.flags.c_contiguous and np.array_equal(out, a)
    f = blas_ready(np.asfortranarray(a))
    assert f.flags.c_contiguous and np.array_equal(f, a)
    assert blas_ready(a, np.float32).dtype == np.float32


def test_one_blas_thread_is_shared_and_restores():
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        entered, release = threading.Event(), threading.Event()
        seen: list[int] = []

        def other() -> None:
            with one_blas_thread():
                entered.set()
                release.wait(10)
                seen.append(blas_threads())

        t = threading.Thread(target=other)
        with one_blas_thread():
            assert blas_threads() == 1
            t.start()
            assert entered.wait(10)
            with one_blas_thread():  # re-entrant
                assert blas_threads() == 1
            assert blas_threads() == 1
        # This thread left first: the other one still computes with one thread.
        assert blas_threads() == 1
        release.set()
        t.join(10)
        assert seen == [1]
        assert blas_threads() == before


def test_a_pin_hands_control_back():
    """threadpoolctl >= 3.8 lets one live thread at a time set OpenBLAS limits: a thread that
    pinned BLAS and lives on must not keep others from setting them."""
    done, release = threading.Event(), threading.Event()

    def pin_and_linger() -> None:
        with one_blas_thread():
            pass
        done.set()
        release.wait(10)

    with threadpool_limits(2, user_api="blas"):
        t = threading.Thread(target=pin_and_linger)
        t.start()
        try:
            assert done.wait(10)
            with threadpool_limits(1, user_api="blas"):
                assert blas_threads() == 1
            assert blas_threads() == 2
        finally:
            release.set()
            t.join(10)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    n, h, m = 64, 48, 1200
    X = np.random.default_rng(21).random((m, n))
    path = tmp_path_factory.mktemp("repro") / "ds"
    write_dataset(path, X, m, n, dtype="float64", chunk_rows=400)
    net = Network.autoencoder(n, h, lam=1e-3, rho=0.05, beta=1.0)
    src = ChunkSource(str(path), "", "float64", open_dataset(str(path)).scale)
    return net, src, X


def test_chunk_sums_do_not_depend_on_the_process_blas_threads(chunked):
    net, src, X = chunked
    theta = net.init_theta(4)
    rh = obj.rho_hat(net, obj.pass1(net, theta, X))
    with threadpool_limits(1, user_api="blas"):
        ref = _bits(_chunk_pass2(net, theta, src, 0, rh))
    with threadpool_limits(2, user_api="blas"):
        assert _bits(_chunk_pass2(net, theta, src, 0, rh)) == ref
        assert blas_threads() == 2  # the engine restored the process's setting
    # NumPy's and SciPy's OpenBLAS are two libraries; a test runner that imports NumPy before
    # setting OPENBLAS_NUM_THREADS=1 leaves NumPy's at 2 and SciPy's at 1.
    import scipy.linalg  # noqa: F401 - loads SciPy's BLAS

    libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    if len(libs) < 2:
        pytest.skip("NumPy and SciPy share one BLAS library here (no mixed counts to test)")
    numpy_first = sorted(libs, key=lambda lib: "numpy" not in lib.filepath)
    with threadpool_limits(1, user_api="blas"):
        for lib, n in zip(numpy_first, [2] + [1] * len(libs), strict=False):
            lib.set_num_threads(n)
        counts = [lib.num_threads for lib in libs]
        assert 2 in counts and 1 in counts
        assert _bits(_chunk_pass2(net, theta, src, 0, rh)) == ref
        assert [lib.num_threads for lib in libs] == counts


def test_same_chunk_sums_on_every_worker_for_any_alignment(two_workers, chunked):
    """The regression test of issue 14: one chunk's sums computed on each worker separately
    (pinned to it), with theta arriving at different byte offsets, and in this process with a
    2-thread BLAS, are the same bits."""
    net, src, X = chunked
    theta = net.init_theta(4)
    rh = obj.rho_hat(net, obj.pass1(net, theta, X))
    theta_pad = np.concatenate([np.zeros(1), theta])

    def shifted(kind: str, offset: int | None, th: np.ndarray, i: int):
        # On the worker: place theta at ``offset`` bytes from a 64-byte boundary (None: as the
        # message delivered it), then call the engine's task function.
        if offset is not None:
            buf = np.empty(th.nbytes + 128, dtype=np.uint8)
            start = (-buf.ctypes.data) % 64 + offset
            placed = buf[start : start + th.nbytes].view(np.float64)
            placed[...] = th
            th = placed
        if kind == "pass1":
            return _chunk_pass1(net, th, src, i)
        if kind == "pass2":
            return _chunk_pass2(net, th, src, i, rh)
        if kind == "fused":
            return _chunk_fused(net, th, src, i)
        return _finalize_one(net, th, _chunk_fused(net, th, src, i))

    workers = sorted(two_workers.scheduler_info()["workers"])
    assert len(workers) == 2
    for kind in ("pass1", "pass2", "fused", "finalize"):
        with threadpool_limits(2, user_api="blas"):
            ref = shifted(kind, None, theta, 1)
        ref_bits = _bits(ref) if isinstance(ref, dict) else ref[1].tobytes()
        for w in workers:
            futures = [
                two_workers.submit(shifted, kind, off, theta, 1, workers=[w], pure=False)
                for off in (None, 0, 8, 3, 7, 55)
            ]

            # theta as a view at an odd offset inside a bigger array in the message.
            def view(k, padded):
                return shifted(k, None, padded[1:], 1)

            futures.append(two_workers.submit(view, kind, theta_pad, workers=[w], pure=False))
            for off, fut in zip((None, 0, 8, 3, 7, 55, "pad"), futures, strict=True):
                got = fut.result()
                got_bits = _bits(got) if isinstance(got, dict) else got[1].tobytes()
                assert got_bits == ref_bits, f"{kind} on {w}, theta at offset {off}"
    pids = two_workers.run(os.getpid)
    assert len(set(pids.values())) == 2


def test_optimizer_steps_do_not_depend_on_the_process_blas_threads(tmp_path):
    """L-BFGS's dot products over 25,828 parameters (a threaded ddot splits vectors of 20,000+
    entries) give the same trajectory in a 2-thread process as in a 1-thread one."""
    from worker.engine import LocalObjective
    from worker.stage import Hooks, Stage, run_stage

    X = np.random.default_rng(8).random((300, 128))
    path = tmp_path / "ds"
    write_dataset(path, X, *X.shape, dtype="float64", chunk_rows=100)
    net = Network.autoencoder(128, 100, lam=1e-3, rho=0.05, beta=1.0)
    assert net.n_params > 20_000
    thetas = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            stage = Stage.of(
                net, net.init_theta(0), tmp_path / f"run{threads}", max_iter=6, pictures=False
            )
            res = run_stage(stage, LocalObjective(str(path), net), Hooks(), write_cost=False)
            assert blas_threads() == threads
        assert res.iterations == 6
        thetas.append(res.theta)
    assert np.array_equal(thetas[0], thetas[1])
