"""What a task computes on one chunk: its stage data (decoded, encoded, cached) and its sums.

The task functions of the engine's graphs (:mod:`worker.engine`) and of the one-process
evaluation (:func:`evaluate_chunks`). Each computes with one BLAS thread, so a chunk's sums are
bitwise the same in any process (see :mod:`worker.engine`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sae import objective as obj
from sae.network import Network
from worker.dataset import read_chunk
from worker.threads import single_threaded
from worker.tree import DEFAULT_FAN_IN, _sum, sequential_tree_sum, streaming_tree_sum

Passes = Literal["two", "fused"]
#: What a stage reconstructs: its own inputs ("previous": the previous layer's activations,
#: the data themselves without an encoder) or the original input x ("input", with an encoder).
Target = Literal["previous", "input"]


@dataclass(frozen=True)
class ChunkSource:
    """Where a task finds its chunk, and how to turn it into the stage's inputs and targets.

    Attributes
    ----------
    path : str
        Dataset path or URL.
    token : str
        Dataset identity (changes when the dataset is rewritten): part of the cache key.
    dtype : {"float64", "float32"}
        Compute dtype (chunks are decoded to it).
    scale : float
        Dataset scale attribute.
    encoder_token : str
        Identity of the frozen encoder ("" for none).
    target : {"previous", "input"}
        Targets of the stage: its inputs, or the original input x (only with an encoder).
    cache_bytes : int
        Bound of the worker's chunk cache in bytes; 0 disables caching.
    """

    path: str
    token: str
    dtype: str
    scale: float
    encoder_token: str = ""
    target: str = "previous"
    cache_bytes: int = 0


class _ChunkCache:
    """A bytes-bounded LRU of decoded chunks, one per worker process (module level)."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, tuple[tuple[np.ndarray | None, ...], int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, value: tuple, limit: int) -> None:
        size = sum(a.nbytes for a in value if a is not None)
        with self._lock:
            if key in self._items:
                return
            if size > limit:
                return
            # Evict entries of other datasets/dtypes first, then least recently used.
            stale = [k for k in self._items if k[:2] != key[:2] or k[2:3] != key[2:3]]
            for k in stale:
                self._drop(k)
            while self._items and self.nbytes + size > limit:
                self._drop(next(iter(self._items)))
            self._items[key] = (value, size)
            self.nbytes += size

    def _drop(self, key: tuple) -> None:
        _, size = self._items.pop(key)
        self.nbytes -= size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0
            self.hits = self.misses = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "nbytes": self.nbytes,
                "hits": self.hits,
                "misses": self.misses,
            }


_CACHE = _ChunkCache()


def cache_stats() -> dict[str, int]:
    """This process's chunk-cache figures (run on workers with ``client.run``)."""
    return _CACHE.stats()


def clear_cache() -> None:
    """Empty this process's chunk cache (run on workers with ``client.run``)."""
    _CACHE.clear()


def _stage_data(
    src: ChunkSource, i: int, encoder: tuple[Network, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs X and targets Y (None: Y = X) of chunk ``i`` for the stage."""
    key = (src.path, src.token, src.dtype, src.encoder_token, src.target, i)
    if src.cache_bytes > 0:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    raw = read_chunk(src.path, i, src.dtype, src.scale)
    if encoder is None:
        out: tuple[np.ndarray, np.ndarray | None] = (raw, None)
    else:
        enc_net, enc_theta = encoder
        X = obj.forward(enc_net, enc_theta, raw, dtype=src.dtype)[-1]
        out = (X, raw if src.target == "input" else None)
    if src.cache_bytes > 0:
        _CACHE.put(key, out, src.cache_bytes)
    return out


@single_threaded
def _chunk_pass1(net: Network, theta: np.ndarray, src: ChunkSource, i: int, encoder=None):
    X, _ = _stage_data(src, i, encoder)
    return obj.pass1(net, theta, X, dtype=src.dtype)


@single_threaded
def _chunk_pass2(
    net: Network, theta: np.ndarray, src: ChunkSource, i: int, rho_hat: dict, encoder=None
):
    X, Y = _stage_data(src, i, encoder)
    return obj.pass2(net, theta, X, rho_hat, Y=Y, dtype=src.dtype)


@single_threaded
def _chunk_fused(net: Network, theta: np.ndarray, src: ChunkSource, i: int, encoder=None):
    X, Y = _stage_data(src, i, encoder)
    return obj.fused(net, theta, X, Y=Y, dtype=src.dtype)


@single_threaded
def _pass2_given_sums1(
    net: Network, theta: np.ndarray, src: ChunkSource, i: int, sums1: obj.Sums, encoder=None
):
    X, Y = _stage_data(src, i, encoder)
    return obj.pass2(net, theta, X, obj.rho_hat(net, sums1), Y=Y, dtype=src.dtype)


@single_threaded
def _finalize_two(net: Network, theta: np.ndarray, s1: obj.Sums, *parts: obj.Sums):
    return obj.finalize(net, theta, obj.merge_sums(s1, _sum(*parts)))


@single_threaded
def _finalize_one(net: Network, theta: np.ndarray, *parts: obj.Sums):
    return obj.finalize(net, theta, _sum(*parts))


@single_threaded
def evaluate_chunks(
    net: Network,
    theta: np.ndarray,
    chunks,
    passes: Passes,
    dtype: str,
    m: int,
    fan_in: int = DEFAULT_FAN_IN,
    n_chunks: int | None = None,
) -> tuple[float, np.ndarray]:
    """The objective from an iterable of ``(X, Y)`` chunk pairs, in one process, with the
    same chunk sums and the same fixed-shape tree as the distributed graph (same bits).

    ``chunks`` is called twice (a callable returning an iterable) for two passes. With
    ``n_chunks`` given, the sums are reduced while they stream (:func:`streaming_tree_sum`):
    at most O(fan_in x depth) chunk sums are alive at once, not one per chunk.
    """

    def reduce(parts) -> obj.Sums:
        if n_chunks is None:
            return sequential_tree_sum(list(parts), fan_in)
        return streaming_tree_sum(parts, n_chunks, fan_in)

    if passes == "fused":
        total = reduce(obj.fused(net, theta, X, Y=Y, dtype=dtype) for X, Y in chunks())
        return obj.finalize(net, theta, total)
    if net.sparse_layers:
        s1 = reduce(obj.pass1(net, theta, X, dtype=dtype) for X, _ in chunks())
        rh = obj.rho_hat(net, s1)
    else:
        s1 = {"count": np.float64(m)}
        rh = {}
    s2 = reduce(obj.pass2(net, theta, X, rh, Y=Y, dtype=dtype) for X, Y in chunks())
    return obj.finalize(net, theta, obj.merge_sums(s1, s2))


@single_threaded
def _whole(
    net: Network,
    theta: np.ndarray,
    src: ChunkSource,
    n: int,
    m: int,
    passes: str,
    fan_in: int,
    encoder=None,
):
    """One task evaluating the whole objective of a small dataset."""

    def chunks():
        return (_stage_data(src, i, encoder) for i in range(n))

    return evaluate_chunks(net, theta, chunks, passes, src.dtype, m, fan_in, n_chunks=n)


# ----------------------------------------------------------------------------- minibatch parts


def _part_data(src: ChunkSource, i: int, rows: np.ndarray, encoder=None):
    """Inputs and targets of the rows ``rows`` of chunk ``i`` (contiguous copies)."""
    X, Y = _stage_data(src, i, encoder)
    return X[rows], (None if Y is None else Y[rows])


def theta_of(theta):
    """``theta``, or the theta of an optimiser's state (the tasks of a chained step,
    :meth:`worker.engine.BatchObjective.step_graph`, take the state)."""
    return getattr(theta, "theta", theta)


@single_threaded
def _part_pass1(net: Network, theta: np.ndarray, src: ChunkSource, i: int, rows, encoder=None):
    theta = theta_of(theta)
    X, _ = _part_data(src, i, rows, encoder)
    return obj.pass1(net, theta, X, dtype=src.dtype)


@single_threaded
def _part_pass2(
    net: Network, theta: np.ndarray, src: ChunkSource, i: int, rows, rho_hat: dict, encoder=None
):
    """Pass 2 on a batch's rows of chunk ``i`` given the sparse layers' ``rho_hat`` (that of
    the batch, or a running average)."""
    theta = theta_of(theta)
    X, Y = _part_data(src, i, rows, encoder)
    return obj.pass2(net, theta, X, rho_hat, Y=Y, dtype=src.dtype)


@single_threaded
def _part_fused(net: Network, theta: np.ndarray, src: ChunkSource, i: int, rows, encoder=None):
    theta = theta_of(theta)
    X, Y = _part_data(src, i, rows, encoder)
    return obj.fused(net, theta, X, Y=Y, dtype=src.dtype)


@single_threaded
def _finalize_batch(net: Network, theta: np.ndarray, s1: obj.Sums, rho: dict, *parts: obj.Sums):
    """``(J, grad, rho)`` of a batch: the two-pass finalize, and the rho_hat its pass 2 used."""
    theta = theta_of(theta)
    J, grad = obj.finalize(net, theta, obj.merge_sums(s1, _sum(*parts)))
    return J, grad, rho


@single_threaded
def _finalize_batch_fused(net: Network, theta: np.ndarray, *parts: obj.Sums):
    """``(J, grad, None)`` of a batch from its fused sums."""
    theta = theta_of(theta)
    J, grad = obj.finalize(net, theta, _sum(*parts))
    return J, grad, None
