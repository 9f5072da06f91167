"""One BLAS thread for everything the engine computes, whatever the process's environment.

OpenBLAS's AVX-512 (SkylakeX) kernels split some products differently with 2 threads than with
1 (e.g. ``delta.T @ A`` of shapes (48, 400) x (400, 64) differs in the last bit), and threaded
dot products of 20,000+ entries add their halves in another order, so a chunk's sums and an
optimizer step depended on how many threads the process's BLAS had. Environment variables
(``OPENBLAS_NUM_THREADS=1``) decide that only if they are set before NumPy is first imported,
which a test runner, a notebook or an external Dask worker does not promise. The engine
therefore sets the thread count itself, at run time, with threadpoolctl: chunk tasks, the
finalize step, :class:`worker.engine.LocalObjective` and the optimizer loop of a stage run
inside :func:`one_blas_thread` (the tree's additions are elementwise and need no pin).

The pin also holds PyTorch, whose threads run the bfloat16 products, to one thread
(:func:`sae.blocks.one_torch_thread`, per calling thread, as PyTorch's count is).

OpenBLAS built with pthreads (NumPy's and SciPy's wheels) has one process-wide limit, so
concurrent users share it: the first to enter sets one thread, the last to leave restores the
previous counts. Built with OpenMP the limit is per thread, and so is the pin.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sae.blocks import one_torch_thread

F = TypeVar("F", bound=Callable[..., Any])


class _Pin:
    """Who holds the limit (a count of users) and what to restore when the last one leaves."""

    def __init__(self) -> None:
        self.depth = 0
        self.restore: list[int] | None = None
        self.libs: list = []


_lock = threading.Lock()
_process_pin = _Pin()
_thread_pins = threading.local()
_controller: Any = None
_modules_seen = -1


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded (NumPy's and SciPy's OpenBLAS
    are two); looked up again when new modules have been imported since (a new import may
    have loaded another BLAS)."""
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        from threadpoolctl import ThreadpoolController

        _modules_seen = len(sys.modules)
        _controller = ThreadpoolController()
    return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


def blas_threads() -> int:
    """The largest thread count among this process's BLAS libraries now."""
    return max((lib.num_threads for lib in _blas_libraries()), default=1)


def _counts(libs: list) -> list[int]:
    return [lib.num_threads for lib in libs]


def _set_blas_threads(libs: list, counts: list[int]) -> None:
    """Set each BLAS library to its count, from whichever thread calls.

    threadpoolctl (>= 3.8) lets one live Python thread at a time change OpenBLAS's
    process-wide limit and ignores the others; the engine's users are runner threads and Dask
    executor threads, so a refused change takes control over (as threadpoolctl's own scope
    probe does), and control is handed back when the pin ends.

    Raises
    ------
    RuntimeError
        If the counts still do not hold (another thread changed them at the same moment).
    """
    import threadpoolctl

    for lib, n in zip(libs, counts, strict=True):
        lib.set_num_threads(n)
    clear = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if _counts(libs) != counts and clear is not None:
        clear(force=True)
        for lib, n in zip(libs, counts, strict=True):
            lib.set_num_threads(n)
    if _counts(libs) != counts:
        raise RuntimeError(
            f"BLAS threads: could not set {counts} (now {_counts(libs)}); another thread is "
            "changing BLAS limits"
        )


def _release_control() -> None:
    """Let other threads set OpenBLAS limits again (threadpoolctl >= 3.8)."""
    import threadpoolctl

    clear = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear()


def _pin_for(libs: list) -> _Pin:
    if any(getattr(lib, "threading_layer", "") == "openmp" for lib in libs):
        pin = getattr(_thread_pins, "pin", None)
        if pin is None:
            pin = _thread_pins.pin = _Pin()
        return pin
    return _process_pin


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the body with every loaded BLAS library limited to one thread (re-entrant and
    shared across threads: the previous counts come back when the last user leaves)."""
    with _lock:
        libs = _blas_libraries()
        pin = _pin_for(libs)
        if pin.depth == 0:
            before = _counts(libs)
            pin.libs = libs
            pin.restore = before if any(n != 1 for n in before) else None
            if pin.restore is not None:
                _set_blas_threads(libs, [1] * len(libs))
        pin.depth += 1
    try:
        with one_torch_thread():  # bfloat16 products run on PyTorch's threads, not BLAS's
            yield
    finally:
        with _lock:
            pin.depth -= 1
            if pin.depth == 0 and pin.restore is not None:
                try:
                    _set_blas_threads(pin.libs, pin.restore)
                finally:
                    pin.restore = None
                    _release_control()


def single_threaded(fn: F) -> F:
    """Decorate ``fn`` to run inside :func:`one_blas_thread`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
