"""One BLAS thread for everything the engine computes, whatever the process's environment.

OpenBLAS's AVX-512 (SkylakeX) kernels split some products differently with 2 threads than with
1 (e.g. ``delta.T @ A`` of shapes (48, 400) x (400, 64) differs in the last bit), so the same
chunk's sums depended on how many threads the process's BLAS had. Environment variables
(``OPENBLAS_NUM_THREADS=1``) decide that only if they are set before NumPy is first imported,
which a test runner, a notebook or an external Dask worker does not promise. The engine
therefore sets the thread count itself, at run time, with threadpoolctl: chunk tasks, the
reduction's root, :class:`worker.engine.LocalObjective` and the optimizer loop of a stage run
inside :func:`one_blas_thread`.

The limit is process-wide (BLAS has one thread pool), so concurrent users share it: the first
to enter sets one thread, the last to leave restores the previous count.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_depth = 0
_restore: list[int] | None = None  # counts to restore when the last user leaves
_controller: Any = None


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded (NumPy's and SciPy's OpenBLAS
    are two), found once per process."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


def blas_threads() -> int:
    """The largest thread count among this process's BLAS libraries now."""
    return max((lib.num_threads for lib in _blas_libraries()), default=1)


def _set_blas_threads(counts: list[int]) -> None:
    """Set each loaded BLAS library to its count, from whichever thread calls.

    threadpoolctl (>= 3.8) lets only one live Python thread change OpenBLAS's process-wide
    limit and silently ignores the others; the engine's users are runner threads and Dask
    executor threads, so a refused change is taken over (the way threadpoolctl resets it).
    """
    from threadpoolctl import OpenBLASController

    libs = _blas_libraries()
    for lib, n in zip(libs, counts, strict=True):
        lib.set_num_threads(n)
    if [lib.num_threads for lib in libs] != counts:
        OpenBLASController.clear_controlling_thread(force=True)
        for lib, n in zip(libs, counts, strict=True):
            lib.set_num_threads(n)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the body with every loaded BLAS library limited to one thread (re-entrant and
    shared across threads: the previous counts come back when the last user leaves)."""
    global _depth, _restore
    with _lock:
        if _depth == 0:
            before = [lib.num_threads for lib in _blas_libraries()]
            _restore = before if any(n != 1 for n in before) else None
            if _restore is not None:
                _set_blas_threads([1] * len(before))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore is not None:
                _set_blas_threads(_restore)
                _restore = None


def single_threaded(fn: F) -> F:
    """Decorate ``fn`` to run inside :func:`one_blas_thread`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
