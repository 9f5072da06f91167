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


def _pass1_keeping(net: Network, theta, X, Y, src: ChunkSource, memo, limit: int):
    """Pass 1 on ``X``; with ``memo``, what pass 2 of the same rows takes up is kept here."""
    keep = [] if memo is not None and net.kind == "sigmoid-kl" else None
    sums = obj.pass1(net, theta, X, dtype=src.dtype, keep=keep)
    if keep:
        _KEPT.put(memo, (X, Y, keep), limit)
    return sums


def _pass2_kept(net: Network, theta, rho_hat: dict, src: ChunkSource, memo, data):
    """Pass 2 given ``rho_hat``, from what pass 1 kept under ``memo`` when it did, else on
    ``data() -> (X, Y)``."""
    kept = _KEPT.pop(memo) if memo is not None else None
    X, Y, given = (*data(), None) if kept is None else kept
    return obj.pass2(net, theta, X, rho_hat, Y=Y, dtype=src.dtype, given=given)


def _chunk_limit(src: ChunkSource) -> int:
    return min(KEPT_CHUNK_BYTES, src.cache_bytes // 4)


@single_threaded
def _chunk_pass1(
    net: Network, theta: np.ndarray, src: ChunkSource, i: int, encoder=None, memo=None
):
    """Pass 1 on chunk ``i``; ``memo``: a key of the chunk unique to this evaluation (what
    pass 1 keeps for pass 2, :class:`_Kept`)."""
    X, Y = _stage_data(src, i, encoder)
    return _pass1_keeping(net, theta, X, Y, src, memo, _chunk_limit(src))


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
    net: Network,
    theta: np.ndarray,
    src: ChunkSource,
    i: int,
    sums1: obj.Sums,
    encoder=None,
    memo=None,
):
    return _pass2_kept(
        net, theta, obj.rho_hat(net, sums1), src, memo, lambda: _stage_data(src, i, encoder)
    )


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


class _Kept(_ChunkCache):
    """What pass 1 leaves on a worker for the pass 2 of the same rows in the same graph (the
    rows and their first activations), by ``(graph token, chunk or part)``: bytes-bounded,
    entries of older graphs out first, and nothing more kept once full (pass 2 takes the
    entries in the order pass 1 made them). A pass 2 that finds nothing (run elsewhere, or
    not kept) computes it all again: the same bits."""

    def put(self, key: tuple, value: tuple, limit: int) -> None:  # type: ignore[override]
        arrays = [value[0], value[1], *(a for block in value[2] for a in block)]
        size = sum(a.nbytes for a in arrays if a is not None)
        with self._lock:
            for k in [k for k in self._items if k[0] != key[0]]:
                if self.nbytes + size <= limit:
                    break
                self.nbytes -= self._items.pop(k)[1]
            if self.nbytes + size <= limit:
                self._items[key] = (value, size)
                self.nbytes += size

    def pop(self, key: tuple):
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self.nbytes -= item[1]
            return item[0]


#: Bytes a worker keeps of a minibatch's pass 1 for its pass 2 (a few parts at a time).
KEPT_PART_BYTES = 64 * 2**20
#: ... and of a full-batch evaluation's, at most (and a quarter of the chunk cache's bound).
KEPT_CHUNK_BYTES = 256 * 2**20


_KEPT = _Kept()


def kept_stats() -> dict[str, int]:
    """This process's figures of what pass 1 left for pass 2 (``client.run`` on workers)."""
    return _KEPT.stats()


@single_threaded
def _part_pass1(
    net: Network, theta: np.ndarray, src: ChunkSource, i: int, rows, encoder=None, memo=None
):
    """Pass 1 on a batch's rows of chunk ``i``; with ``memo`` (a key unique to the part of
    this graph), the rows and their activations are kept for its pass 2 (:class:`_Kept`)."""
    theta = theta_of(theta)
    X, Y = _part_data(src, i, rows, encoder)
    return _pass1_keeping(net, theta, X, Y, src, memo, KEPT_PART_BYTES)


@single_threaded
def _part_pass2(
    net: Network,
    theta: np.ndarray,
    src: ChunkSource,
    i: int,
    rows,
    rho_hat: dict,
    encoder=None,
    memo=None,
):
    """Pass 2 on a batch's rows of chunk ``i`` given the sparse layers' ``rho_hat`` (that of
    the batch, or a running average), from what its pass 1 kept here when it did."""
    theta = theta_of(theta)
    return _pass2_kept(net, theta, rho_hat, src, memo, lambda: _part_data(src, i, rows, encoder))


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
