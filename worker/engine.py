"""The distributed objective: ``f(theta) -> (J, grad)`` as one Dask graph over Zarr chunks.

One evaluation is one graph sent with ``client.get`` (keys named by pass and job, so the
dashboard's task stream shows pass 1 and pass 2 of each evaluation)::

    pass1-<job> (chunk 0) ─┐
    pass1-<job> (chunk 1) ─┼─ sum1-<job> (tree) ─ total1 ─┬─ pass2-<job> (chunk 0) ─┐
    ...                    ┘                               ├─ pass2-<job> (chunk 1) ─┼─ sum2-<job>
                                                           └─ ...                    ┘  (tree)
                                                                 final-<job> -> (J, grad)

each pass-2 task computes rho_hat from the pass-1 total it depends on, inside the graph.
``passes="fused"`` has ``fused-<job>`` leaves, a ``sum-<job>`` tree and ``final-<job>``. A
small dataset (one chunk, or up to :data:`SINGLE_TASK_BYTES`) is evaluated by one task
``whole-<job>`` with the same chunk sums and tree.

- Tasks read their own chunk with :func:`worker.dataset.read_chunk`; the client never ships
  data and nothing concatenates chunks. A task's result is a dict of sums of size O(params).
- Partial sums are added by a tree of fixed shape over chunk indices (consecutive groups of
  ``fan_in``), so the same theta gives bitwise the same J and gradient whichever worker
  computed which chunk, with any number of workers and after any recomputation.
- ``passes="fused"`` reads each chunk once (:func:`sae.objective.fused`); a network without a
  sparse layer skips pass 1.
- When the dataset fits in the workers' memory, decoded chunks stay in a bytes-bounded LRU
  cache on each worker, and chunk ``i`` is pinned to worker ``(i + k) mod n`` (``k`` from a
  hash of the path, so that small datasets spread over the workers; other workers may
  still run it, e.g. after a fault), so each evaluation reads from memory.
- theta is inlined in the tasks when small, else embedded once in the graph (as is a frozen
  encoder), never sent once per task.

Bitwise equality (across worker counts, plans, recomputations and :class:`LocalObjective`)
holds because the engine fixes what a BLAS result depends on besides its inputs' values:

- layout and alignment: the math hands BLAS C-contiguous, item-aligned arrays
  (:func:`sae.blas.blas_ready`); theta arriving in a task as a view at an odd byte offset of a
  message frame is copied first, so ``X @ W.T`` is always the same GEMM case;
- threads: every task function here that computes (chunk sums, finalize, the whole-dataset
  task; the tree's additions are elementwise), :class:`LocalObjective` and the optimizer loop
  of a stage run with one BLAS thread (:func:`worker.threads.one_blas_thread`, set at run
  time, whatever the process's environment or the workers' ``OMP_NUM_THREADS``).

What remains is the BLAS kernel itself: sums are bitwise the same wherever they run with one
kernel (OpenBLAS picks SkylakeX on AVX-512 CPUs, Haswell on AVX2, or ``OPENBLAS_CORETYPE``);
workers running different kernels agree to rounding only. ``tests/test_reproducibility.py``
and the ``bitwise`` tests run under both kernels in CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sae import objective as obj
from sae.blas import blas_ready
from sae.network import Network
from worker.dataset import ChunkError, DatasetInfo, open_dataset, read_chunk, write_id
from worker.threads import one_blas_thread, single_threaded

Passes = Literal["two", "fused"]
Target = Literal["inputs", "raw"]

DEFAULT_FAN_IN = 8
#: Datasets up to this size (decoded) are evaluated by one task (no scheduling per chunk).
SINGLE_TASK_BYTES = 4 * 2**20
#: theta is inlined in every task while (theta bytes x chunks) stays under this.
INLINE_THETA_BYTES = 2**20
#: The chunk cache of a worker may use this share of its memory limit, minus
#: :data:`CACHE_RESERVED_BYTES` (the interpreter, libraries and a task's working set): it stays
#: below the worker's pause threshold (80% of the limit).
CACHE_FRACTION = 0.6
CACHE_RESERVED_BYTES = 256 * 2**20
#: An evaluation waiting for its result checks ``should_stop`` this often (seconds).
POLL_SECONDS = 0.2


class Cancelled(Exception):
    """Raised by an objective when its ``should_stop`` callback asks to stop."""


# --------------------------------------------------------------------------- worker side


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
    target : {"inputs", "raw"}
        Targets of the stage: its inputs, or the raw chunk (only with an encoder).
    cache_bytes : int
        Bound of the worker's chunk cache in bytes; 0 disables caching.
    """

    path: str
    token: str
    dtype: str
    scale: float
    encoder_token: str = ""
    target: str = "inputs"
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
        out = (X, raw if src.target == "raw" else None)
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


def _sum(*parts: obj.Sums) -> obj.Sums:
    """Add partial sums left to right (a fixed order)."""
    total = parts[0]
    for p in parts[1:]:
        total = obj.add_sums(total, p)
    return total


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


# --------------------------------------------------------------------------- the tree


def tree_levels(n: int, fan_in: int = DEFAULT_FAN_IN) -> list[list[tuple[int, int]]]:
    """The fixed shape of the reduction tree over ``n`` leaves.

    Consecutive groups of ``fan_in`` nodes are added level by level until at most ``fan_in``
    nodes remain; those are added by the root. The shape depends only on ``n`` and
    ``fan_in``.

    Returns
    -------
    levels : list of list of (start, stop)
        For each inner level, the ranges of the previous level's nodes each node adds (a
        range of one node is passed through unchanged).
    """
    if fan_in < 2:
        raise ValueError(f"fan_in: must be >= 2, got {fan_in}")
    levels = []
    width = n
    while width > fan_in:
        groups = [(j, min(j + fan_in, width)) for j in range(0, width, fan_in)]
        levels.append(groups)
        width = len(groups)
    return levels


def tree_sum(
    dsk: dict, leaves: Sequence[Any], prefix: str, fan_in: int = DEFAULT_FAN_IN
) -> list[Any]:
    """Add the inner levels of the fixed-shape tree over ``leaves`` to ``dsk``.

    Returns
    -------
    keys : list
        At most ``fan_in`` keys whose sum, in order, is the total (the root's inputs).
    """
    level = list(leaves)
    for depth, groups in enumerate(tree_levels(len(leaves), fan_in)):
        nxt = []
        for j, (a, b) in enumerate(groups):
            if b - a == 1:
                nxt.append(level[a])
                continue
            key = (prefix, depth, j)
            dsk[key] = (_sum, *level[a:b])
            nxt.append(key)
        level = nxt
    return level


def sequential_tree_sum(parts: Sequence[obj.Sums], fan_in: int = DEFAULT_FAN_IN) -> obj.Sums:
    """The same fixed-shape tree as :func:`tree_sum` plus its root, in one process."""
    level = list(parts)
    for groups in tree_levels(len(level), fan_in):
        level = [level[a] if b - a == 1 else _sum(*level[a:b]) for a, b in groups]
    return _sum(*level)


def streaming_tree_sum(parts, n: int, fan_in: int = DEFAULT_FAN_IN) -> obj.Sums:
    """:func:`sequential_tree_sum` over an iterable of ``n`` sums, reduced while streaming.

    Each node of the fixed-shape tree is added as soon as its last input arrives, so at
    most ``fan_in`` sums per level (O(fan_in x depth)) are alive at once, whatever ``n``;
    the additions are the same, in the same order (bitwise the same total).

    Parameters
    ----------
    parts : iterable of Sums
        The leaves, in chunk order (a generator is consumed one item at a time).
    n : int
        Number of leaves (the shape of the tree depends on it).
    fan_in : int

    Raises
    ------
    ValueError
        If ``parts`` does not yield exactly ``n`` items.
    """
    levels = tree_levels(n, fan_in)
    depth = len(levels)
    bufs: list[list[obj.Sums]] = [[] for _ in range(depth + 1)]
    pos = [0] * depth  # index of the group being filled at each level

    def push(item: obj.Sums) -> None:
        d = 0
        while d < depth:
            a, b = levels[d][pos[d]]
            bufs[d].append(item)
            if len(bufs[d]) < b - a:
                return
            grp, bufs[d] = bufs[d], []
            pos[d] += 1
            item = grp[0] if len(grp) == 1 else _sum(*grp)
            del grp
            d += 1
        bufs[depth].append(item)

    count = 0
    for p in parts:
        count += 1
        if count > n:
            raise ValueError(f"parts: expected {n} sums, got more")
        push(p)
        del p
    if count != n:
        raise ValueError(f"parts: expected {n} sums, got {count}")
    return _sum(*bufs[depth])


# --------------------------------------------------------------------------- helpers


def dataset_token(path: str) -> str:
    """An identity of the dataset's current version (changes when it is rewritten)."""
    p = str(path)
    if "://" not in p or p.startswith("file://"):
        local = p[len("file://") :] if p.startswith("file://") else p
        try:
            st = os.stat(os.path.join(local, "zarr.json"))
            return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
        except OSError:
            return uuid.uuid4().hex
    wid = write_id(p)
    if wid:  # remote stores: the id of the write (unique per write_dataset)
        return f"w-{wid}"
    try:  # a dataset written before write_id: the group metadata's content
        import fsspec

        with fsspec.open(p.rstrip("/") + "/zarr.json", "rb") as fh:
            return hashlib.sha1(fh.read()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - no token: do not reuse cached chunks
        return uuid.uuid4().hex


def array_token(a: np.ndarray) -> str:
    """A content hash of an array."""
    a = np.ascontiguousarray(a)
    return hashlib.blake2b(a.view(np.uint8).ravel(), digest_size=12).hexdigest()


def _clean_job(job: str) -> str:
    """A job name usable inside a key prefix (letters only survive Dask's key_split)."""
    s = re.sub(r"[^A-Za-z0-9_]+", "_", job).strip("_")
    return s or "job"


@dataclass
class EvalStats:
    """Counters of an objective."""

    n_evals: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0
    times: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the objective


class DistributedObjective:
    """``f(theta) -> (J, grad)`` evaluated as one Dask graph per call.

    Parameters
    ----------
    client : distributed.Client
    dataset_path : str
        A dataset written by :func:`worker.dataset.write_dataset`.
    net : Network
        The network (of the stage) to train; its input size is the dataset's width (or the
        encoder's code size).
    passes : {"two", "fused"}
        Two reads per chunk (pass 1 then pass 2) or one (fused sums).
    dtype : {"float64", "float32"}
        Compute dtype; sums are always float64.
    encoder : (Network, ndarray of shape (n_enc_params,)), optional
        A frozen encoder: the stage's inputs are the last layer of
        ``sae.objective.forward(enc_net, enc_theta, raw_chunk)``.
    target : {"inputs", "raw"}
        Targets: the stage's inputs (an autoencoder) or the raw chunk (with an encoder).
    job : str
        Name used in the task keys (``pass1-<job>``, ``pass2-<job>``, ``sum1-<job>`` ...).
    cache : bool, optional
        Keep decoded chunks in worker memory; default: when the dataset fits in half of the
        workers' memory.
    fan_in : int
        Fan-in of the reduction tree (2..8).
    should_stop : callable, optional
        Checked before each evaluation and every :data:`POLL_SECONDS` while one runs (or
        waits for busy or absent workers); when it returns True the call cancels the
        evaluation's tasks and raises :class:`Cancelled`.
    single_task : bool, optional
        Evaluate everything in one task (``whole-<job>``): no per-chunk scheduling, the same
        bits. Default: for one chunk or up to :data:`SINGLE_TASK_BYTES` of data.

    Attributes
    ----------
    info : DatasetInfo
    stats : EvalStats
        ``n_evals``, cumulative ``seconds`` and per-evaluation ``times``.
    """

    def __init__(
        self,
        client,
        dataset_path: str,
        net: Network,
        passes: Passes = "two",
        dtype: str = "float64",
        encoder: tuple[Network, np.ndarray] | None = None,
        target: Target = "inputs",
        job: str = "sae",
        cache: bool | None = None,
        fan_in: int = DEFAULT_FAN_IN,
        should_stop=None,
        single_task: bool | None = None,
    ) -> None:
        if passes not in ("two", "fused"):
            raise ValueError(f"passes: choose 'two' or 'fused', got {passes!r}")
        if dtype not in obj.DTYPES:
            raise ValueError(f"dtype: choose one of {sorted(obj.DTYPES)}, got {dtype!r}")
        if target not in ("inputs", "raw"):
            raise ValueError(f"target: choose 'inputs' or 'raw', got {target!r}")
        if not 2 <= fan_in <= 8:
            raise ValueError(f"fan_in: choose 2..8, got {fan_in}")
        self.client = client
        self.path = str(dataset_path)
        self.info: DatasetInfo = open_dataset(self.path)
        self.net = net
        self.passes = passes
        self.dtype = dtype
        self.target = target
        self.job = _clean_job(job)
        self.fan_in = fan_in
        self.should_stop = should_stop
        self.single_task = single_task
        self.stats = EvalStats()
        n_raw = self.info.shape[1]
        if encoder is not None:
            enc_net, enc_theta = encoder
            enc_theta = np.asarray(enc_theta, dtype=np.float64)
            if enc_net.sizes[0] != n_raw:
                raise ValueError(
                    f"encoder: its input size {enc_net.sizes[0]} differs from the dataset's "
                    f"{n_raw} features"
                )
            if enc_theta.shape != (enc_net.n_params,):
                raise ValueError(f"encoder: theta must have {enc_net.n_params} entries")
            n_in = enc_net.sizes[-1]
            self.encoder = (enc_net, enc_theta)
            self._enc_token = array_token(enc_theta) + str(enc_net.sizes)
        else:
            n_in = n_raw
            self.encoder = None
            self._enc_token = ""
        if net.sizes[0] != n_in:
            raise ValueError(f"net: input size {net.sizes[0]} differs from the data's {n_in}")
        n_out = n_raw if (encoder is not None and target == "raw") else n_in
        if net.sizes[-1] != n_out:
            raise ValueError(
                f"net: output size {net.sizes[-1]} differs from the targets' {n_out} "
                f"(target={target!r})"
            )
        if target == "raw" and encoder is None:
            self.target = "inputs"  # the raw chunk is the input
        if passes == "fused":
            obj.check_fused(net)
        self._workers: list[str] = []
        self._workers_time = 0.0
        self._mem_limit = 0
        self._token = dataset_token(self.path)
        # Datasets start their round-robin at different workers (small jobs spread out).
        self._offset = zlib.crc32(self.path.encode())
        self._cache_request = cache
        self.cache_bytes = 0
        self._refresh_workers(force=True)

    # ------------------------------------------------------------------ cluster facts
    def _refresh_workers(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._workers_time < 5.0:
            return
        info = self.client.scheduler_info(n_workers=-1)
        ws = info.get("workers", {})
        self._workers = sorted(ws)
        limits = [w.get("memory_limit") or 0 for w in ws.values()]
        self._mem_limit = min(limits) if limits and all(limits) else 0
        self._workers_time = now
        self.cache_bytes = self._cache_budget()

    def _stage_nbytes(self) -> int:
        """Bytes of the decoded stage data (inputs, and raw targets) in the compute dtype."""
        item = np.dtype(self.dtype).itemsize
        m = self.info.shape[0]
        n = self.net.sizes[0]
        if self.encoder is not None and self.target == "raw":
            n += self.info.shape[1]
        return m * n * item

    def _cache_budget(self) -> int:
        n = max(1, len(self._workers))
        limit = self._mem_limit
        if not limit:
            import psutil

            limit = psutil.virtual_memory().total // n
        budget = max(0, int(CACHE_FRACTION * limit) - CACHE_RESERVED_BYTES)
        need = -(-self._stage_nbytes() // n)
        # One chunk more per worker: chunk counts do not divide evenly.
        chunk = self.info.chunk_rows * self._stage_nbytes() // max(1, self.info.shape[0])
        need += chunk
        if self._cache_request is False:
            return 0
        if self._cache_request is None and need > budget:
            return 0
        return max(budget, need) if self._cache_request else budget

    # ------------------------------------------------------------------ the graph
    def graph(self, theta: np.ndarray):
        """The task graph of one evaluation.

        Returns
        -------
        hlg : dask HighLevelGraph
        key : the key of ``(J, grad)``
        """
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        net, job = self.net, self.job
        tok = uuid.uuid4().hex[:8]
        src = ChunkSource(
            path=self.path,
            token=self._token,
            dtype=self.dtype,
            scale=self.info.scale,
            encoder_token=self._enc_token,
            target=self.target,
            cache_bytes=self.cache_bytes,
        )
        n = self.info.n_chunks
        theta = np.asarray(theta, dtype=np.float64)
        common: dict = {}
        if theta.nbytes * n <= INLINE_THETA_BYTES:
            th: Any = theta  # small: inline in each task
        else:  # one copy in the graph, fetched by the tasks that need it
            th = f"theta-{job}-{tok}"
            common[th] = theta
        enc_args: tuple = ()
        if self.encoder is not None:
            enc_key = f"encoder-{job}-{tok}"
            common[enc_key] = self.encoder
            enc_args = (enc_key,)
        pinned: dict[int, dict] = {}  # worker index -> tasks pinned to it

        def pin(i: int) -> dict:
            if not self._workers or self.cache_bytes == 0:
                return common
            return pinned.setdefault((i + self._offset) % len(self._workers), {})

        single = self.single_task
        if single is None:
            single = n == 1 or self._stage_nbytes() <= SINGLE_TASK_BYTES
        if single:
            # Small: one task evaluates everything (same sums, same tree, same bits).
            final = f"whole-{job}-{tok}"
            pin(0)[final] = (
                _whole,
                net,
                th,
                src,
                n,
                self.info.shape[0],
                self.passes,
                self.fan_in,
                *enc_args,
            )
        elif self.passes == "fused":
            leaves = []
            for i in range(n):
                k = (f"fused-{job}-{tok}", i)
                pin(i)[k] = (_chunk_fused, net, th, src, i, *enc_args)
                leaves.append(k)
            roots = tree_sum(common, leaves, f"sum-{job}-{tok}", self.fan_in)
            final = f"final-{job}-{tok}"
            common[final] = (_finalize_one, net, th, *roots)
        else:
            if net.sparse_layers:
                leaves1 = []
                for i in range(n):
                    k = (f"pass1-{job}-{tok}", i)
                    pin(i)[k] = (_chunk_pass1, net, th, src, i, *enc_args)
                    leaves1.append(k)
                roots1 = tree_sum(common, leaves1, f"sum1-{job}-{tok}", self.fan_in)
                if len(roots1) == 1:  # one chunk: its sums are the total
                    total1 = roots1[0]
                else:
                    total1 = f"sum1-{job}-{tok}"
                    common[total1] = (_sum, *roots1)
            else:
                total1 = f"count-{job}-{tok}"
                common[total1] = {"count": np.float64(self.info.shape[0])}
            leaves2 = []
            for i in range(n):
                k = (f"pass2-{job}-{tok}", i)
                pin(i)[k] = (_pass2_given_sums1, net, th, src, i, total1, *enc_args)
                leaves2.append(k)
            roots2 = tree_sum(common, leaves2, f"sum2-{job}-{tok}", self.fan_in)
            final = f"final-{job}-{tok}"
            common[final] = (_finalize_two, net, th, total1, *roots2)

        layers = {f"common-{tok}": MaterializedLayer(common)}
        deps: dict[str, set] = {f"common-{tok}": set()}
        for w, tasks in pinned.items():
            name = f"pinned-{tok}-{w}"
            layers[name] = MaterializedLayer(
                tasks,
                annotations={"workers": [self._workers[w]], "allow_other_workers": True},
            )
            deps[name] = set()
        return HighLevelGraph(layers, deps), final

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Cost and gradient at ``theta``.

        Parameters
        ----------
        theta : ndarray of shape (net.n_params,)

        Returns
        -------
        J : float
        grad : ndarray of shape (net.n_params,)

        Raises
        ------
        Cancelled
            If ``should_stop()`` is true before or during the evaluation.
        worker.dataset.ChunkError
            If a chunk is missing, unreadable or non-finite (the message names it).
        """
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("stopped before an evaluation")
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.net.n_params,):
            raise ValueError(f"theta: expected shape ({self.net.n_params},), got {theta.shape}")
        t0 = time.perf_counter()
        self._refresh_workers()
        hlg, key = self.graph(theta)
        J, grad = self._wait(self.client.get(hlg, key, sync=False))
        grad = blas_ready(grad, np.float64)  # a view into a message frame may be unaligned
        dt = time.perf_counter() - t0
        self.stats.n_evals += 1
        self.stats.seconds += dt
        self.stats.last_seconds = dt
        self.stats.times.append(dt)
        return float(J), grad

    def _wait(self, future):
        """The result of an evaluation's future, checking ``should_stop`` every
        :data:`POLL_SECONDS` (an evaluation may wait long for busy or absent workers)."""
        from distributed import wait

        try:
            while True:
                try:
                    wait([future], timeout=POLL_SECONDS)
                    break
                except TimeoutError:
                    if self.should_stop is not None and self.should_stop():
                        raise Cancelled("stopped during an evaluation") from None
            return future.result()
        finally:
            if not future.done():
                with contextlib.suppress(Exception):
                    self.client.cancel(future)
            future.release()

    @property
    def n_evals(self) -> int:
        """Evaluations so far."""
        return self.stats.n_evals


# --------------------------------------------------------------------------- local twin


class LocalObjective:
    """The same chunk sums and the same reduction tree, computed in one process.

    Gives bitwise the results of :class:`DistributedObjective` with the same arguments (the
    chunks are read once and kept in memory) under the same BLAS kernel, in any process: it
    computes with one BLAS thread whatever the process's setting (see the module docstring).
    Used to run a small job's whole optimisation as one task next to its data.
    """

    def __init__(
        self,
        dataset_path: str,
        net: Network,
        passes: Passes = "two",
        dtype: str = "float64",
        encoder: tuple[Network, np.ndarray] | None = None,
        target: Target = "inputs",
        fan_in: int = DEFAULT_FAN_IN,
        should_stop=None,
    ) -> None:
        self.path = str(dataset_path)
        self.info = open_dataset(self.path)
        self.net = net
        self.passes = passes
        self.dtype = dtype
        self.fan_in = fan_in
        self.should_stop = should_stop
        self.stats = EvalStats()
        if target == "raw" and encoder is None:
            target = "inputs"
        if passes == "fused":
            obj.check_fused(net)
        src = ChunkSource(self.path, "", dtype, self.info.scale, "", target, 0)
        enc = None
        if encoder is not None:
            enc = (encoder[0], np.asarray(encoder[1], dtype=np.float64))
        with one_blas_thread():
            self.chunks = [_stage_data(src, i, enc) for i in range(self.info.n_chunks)]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("stopped before an evaluation")
        t0 = time.perf_counter()
        theta = np.asarray(theta, dtype=np.float64)
        out = evaluate_chunks(
            self.net,
            theta,
            lambda: iter(self.chunks),
            self.passes,
            self.dtype,
            self.info.shape[0],
            self.fan_in,
            n_chunks=len(self.chunks),
        )
        d = time.perf_counter() - t0
        self.stats.n_evals += 1
        self.stats.seconds += d
        self.stats.last_seconds = d
        self.stats.times.append(d)
        return out

    @property
    def n_evals(self) -> int:
        """Evaluations so far."""
        return self.stats.n_evals


__all__ = [
    "Cancelled",
    "ChunkError",
    "ChunkSource",
    "DistributedObjective",
    "LocalObjective",
    "cache_stats",
    "clear_cache",
    "dataset_token",
    "sequential_tree_sum",
    "streaming_tree_sum",
    "tree_sum",
]
