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

Bitwise equality (across worker counts, executions, recomputations and :class:`LocalObjective`)
holds because the engine fixes what a BLAS result depends on besides its inputs' values:

- layout and alignment: the math hands BLAS C-contiguous, item-aligned arrays
  (:func:`sae.blas.blas_ready`); theta arriving in a task as a view at an odd byte offset of a
  message frame is copied first, so ``X @ W.T`` is always the same GEMM case;
- threads: every task function that computes (chunk sums, finalize and the whole-dataset
  task in :mod:`worker.chunks`; the tree's additions are elementwise), :class:`LocalObjective`
  and the optimizer loop of a stage run with one BLAS thread
  (:func:`worker.threads.one_blas_thread`, set at run time, whatever the process's
  environment or the workers' ``OMP_NUM_THREADS``).

What remains is the BLAS kernel itself: sums are bitwise the same wherever they run with one
kernel (OpenBLAS picks SkylakeX on AVX-512 CPUs, Haswell on AVX2, or ``OPENBLAS_CORETYPE``);
workers running different kernels agree to rounding only. ``tests/test_reproducibility.py``
and the ``bitwise`` tests run under both kernels in CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import re
import threading
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from sae import objective as obj
from sae.blas import blas_ready
from sae.network import Network
from worker import chunks
from worker.chunks import (
    ChunkSource,
    Passes,
    Target,
    _chunk_fused,
    _chunk_pass1,
    _finalize_one,
    _finalize_two,
    _pass2_given_sums1,
    _stage_data,
    _whole,
    evaluate_chunks,
)
from worker.dataset import DatasetInfo, dataset_version, open_dataset
from worker.threads import one_blas_thread
from worker.tree import DEFAULT_FAN_IN, _sum, tree_sum

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
#: An evaluation lost with the scheduler (it restarted) is sent again once the client has
#: reconnected, up to this many times in a row.
RESUBMITS = 20
#: A result not there after this many seconds makes the wait look for stranded tasks
#: (:func:`reschedule_stranded`), then again at this interval.
STRANDED_SECONDS = 2.0


class Cancelled(Exception):
    """Raised by an objective when its ``should_stop`` callback asks to stop."""


class SchedulerLost(ConnectionError):
    """The connection to the Dask scheduler went away and did not come back (the client
    stopped reconnecting); the message names the address."""


def lost_with_scheduler(exc: BaseException, future=None) -> bool:
    """True when ``exc``, raised while waiting for ``future``, says the connection to the
    scheduler went away (the work can be sent again once the client has reconnected), not
    that a task failed."""
    from distributed.client import FutureCancelledError, FuturesCancelledError
    from distributed.comm.core import CommClosedError

    lost = "scheduler-connection-lost"  # the reason the client gives its futures then
    if isinstance(exc, FutureCancelledError):
        return exc.reason == lost
    if isinstance(exc, FuturesCancelledError):
        return bool(exc.error_groups) and all(g.reason == lost for g in exc.error_groups)
    # Comm errors ("Timed out trying to connect" is a plain OSError), not a missing file; and
    # not a task's own error (its future is erred).
    if isinstance(exc, (CommClosedError, ConnectionError)) or type(exc) is OSError:
        return getattr(future, "status", None) != "error"
    return False


def reschedule_stranded(client) -> int:
    """Have the scheduler place the tasks Dask left in ``no-worker`` though they may run on
    any worker; how many (0 when it cannot ask).

    A task pinned to a worker with ``allow_other_workers`` (chunk tasks pinned to the worker
    caching their chunk; a stage's task next to its data) that became ready while no worker
    was running (all had died, or were being restarted by their nannies) stays ``no-worker``
    for ever: when workers arrive, Dask (2026.8) checks only the task's worker restrictions,
    which name dead workers. This makes the recommendation Dask makes for other tasks then.
    """

    def place(dask_scheduler) -> int:
        if not dask_scheduler.running:
            return 0
        recs = {ts.key: "processing" for ts in dask_scheduler.unrunnable if ts.loose_restrictions}
        if recs:
            dask_scheduler.transitions(recs, stimulus_id=f"sae-stranded-{time.time()}")
        return len(recs)

    try:
        return int(client.run_on_scheduler(place))
    except Exception:  # noqa: BLE001 - best effort (a scheduler gone, or refusing pickles)
        return 0


class StrandedCheck:
    """Calls :func:`reschedule_stranded` while a wait lasts, every
    :data:`STRANDED_SECONDS`."""

    def __init__(self, client) -> None:
        self.client = client
        self.next = time.monotonic() + STRANDED_SECONDS

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + STRANDED_SECONDS
            reschedule_stranded(self.client)


def wait_reconnected(client, should_stop=None) -> None:
    """Wait until ``client`` is connected to its scheduler again.

    Raises
    ------
    Cancelled
        If ``should_stop()`` becomes true meanwhile.
    SchedulerLost
        If the client gave up reconnecting (it closes itself after its timeout).
    """
    while True:
        status = getattr(client, "status", "running")
        if status == "running":
            return
        if status in ("closing", "closed"):
            address = getattr(getattr(client, "scheduler", None), "address", "?")
            raise SchedulerLost(
                f"scheduler: the connection to {address} was lost and did not come back; "
                "start the scheduler again at that address, then resubmit the job (it resumes "
                "from its last checkpoint)"
            )
        if should_stop is not None and should_stop():
            raise Cancelled("stopped while the scheduler was away")
        time.sleep(POLL_SECONDS)


class WorkersDied(RuntimeError):
    """The workers that ran one of a job's tasks all died (Dask's ``KilledWorker``, chained
    as ``__cause__``); the message says what most often kills them and what to change."""


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def workers_died(
    exc: Exception,
    client=None,
    *,
    chunk_bytes: int | None = None,
    data_bytes: int | None = None,
    whole_task: bool = False,
) -> WorkersDied:
    """A clear error for a ``distributed.KilledWorker`` that reached a job.

    Dask raises it when every worker that tried a task died while running it (by default 4
    in turn). Most often they died for memory: a worker's nanny kills it past 95% of its
    memory limit. The message gives the limit (from ``client``'s scheduler, else the last
    worker's), its threads, the size of a chunk and what to change.

    Parameters
    ----------
    exc : distributed.KilledWorker
    client : distributed.Client, optional
    chunk_bytes, data_bytes : int, optional
        Decoded sizes of one chunk and of the stage's whole data in the compute dtype.
    whole_task : bool
        The task held the whole stage's data (a stage next to its data).

    Returns
    -------
    WorkersDied
        To raise ``from exc``.
    """
    task = getattr(exc, "task", None)
    n = getattr(exc, "allowed_failures", None)
    last = getattr(exc, "last_worker", None)
    limits, threads = [], []
    with contextlib.suppress(Exception):
        for w in client.scheduler_info(n_workers=-1).get("workers", {}).values():
            limits.append(int(w.get("memory_limit") or 0))
            threads.append(int(w.get("nthreads") or 0))
    if not limits and last is not None:
        limits = [int(getattr(last, "memory_limit", 0) or 0)]
        threads = [int(getattr(last, "nthreads", 0) or 0)]
    if isinstance(n, int):
        who = "1 worker, which" if n == 0 else f"{n + 1} workers in turn, which all"
    else:
        who = "workers, which all"
    where = f" (the last {last.address})" if getattr(last, "address", None) else ""
    facts = []
    if limits and all(limits):
        t = max(threads) if threads else 0
        per = f" with {t} thread{'s' if t > 1 else ''}" if t else ""
        facts.append(f"each worker may use {_size(min(limits))}{per}")
    elif limits:
        facts.append("the workers have no memory limit (the system may have killed them)")
    if chunk_bytes:
        facts.append(f"one chunk of the data takes {_size(chunk_bytes)} decoded")
    if data_bytes and whole_task:
        facts.append(f"the stage runs as one task holding all its data, {_size(data_bytes)}")
    change = [
        "a larger memory limit per worker (--memory-limit of `sae train` / `sae serve`, or "
        "of `dask worker`)",
        "fewer threads per worker (--threads-per-worker)",
        "smaller chunks (ingest the dataset again with --chunk-rows)",
        'the float32 dtype (--dtype float32, or "dtype": "float32" in the job\'s spec)',
    ]
    if whole_task:
        change.insert(0, "the distributed plan (--plan distributed: a task per chunk)")
    message = (
        f"workers died: task {task!r} of this job ran on {who} died while running it{where}. "
        "Most often a worker dies for memory: its nanny kills it past 95% of its memory limit"
        + (f". Here {'; '.join(facts)}" if facts else "")
        + f". To fix, change one of: {'; '.join(change)}. The workers' logs say why they died."
    )
    return WorkersDied(message)


# --------------------------------------------------------------------------- helpers


def dataset_token(path: str) -> str:
    """The dataset's version (:func:`worker.dataset.dataset_version`) in task and cache keys;
    a fresh random token when unknown (nothing cached is reused)."""
    return dataset_version(path) or uuid.uuid4().hex


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


class _Graph:
    """The tasks of one evaluation of a :class:`DistributedObjective`, being built.

    Tasks on chunks are pinned to the worker that caches the chunk (when caching); the
    rest (theta, the encoder, the tree, finalize) are in one common layer.
    """

    def __init__(self, f: DistributedObjective, theta: np.ndarray | None, state=None) -> None:
        self.f, self.net, self.job = f, f.net, f.job
        self.tok = uuid.uuid4().hex[:8]
        self.n = f.info.n_chunks
        self.src = ChunkSource(
            path=f.path,
            token=f._token,
            dtype=f.dtype,
            scale=f.info.scale,
            encoder_token=f._enc_token,
            target=f.target,
            cache_bytes=f.cache_bytes,
        )
        self.common: dict = {}
        self.pinned: dict[int, dict] = {}  # worker index -> tasks pinned to it
        self.state = None
        self.copies: dict[int, Any] = {}  # worker index -> the future of a state's copy there
        self.groups: list[int] = []  # the workers of the batch's parts (part_leaves)
        if isinstance(state, StateCopies):  # each worker's tasks take the copy it holds
            self.copies = dict(state.futures)
            self.state = self.th = STATE
        elif state is not None:  # an optimiser's state (or the future of one): the tasks
            # take its theta themselves (a task less to wait for on the step's path)
            self.state = self.th = state
            if not hasattr(state, "key"):  # held here: one copy in the graph
                self.state = self.th = self.key("state-in")
                self.common[self.state] = (_same, state)
        elif theta.nbytes * self.n <= INLINE_THETA_BYTES:
            self.th: Any = theta  # small: inline in each task
        else:  # one copy in the graph, fetched by the tasks that need it
            self.th = self.key("theta")
            self.common[self.th] = theta
        self.enc_args: tuple = ()
        if f.encoder is not None:
            enc_key = self.key("encoder")
            self.common[enc_key] = f.encoder
            self.enc_args = (enc_key,)

    def key(self, name: str) -> str:
        """The key ``<name>-<job>-<token>``."""
        return f"{name}-{self.job}-{self.tok}"

    def pin(self, i: int) -> dict:
        """The layer of the tasks on chunk ``i``."""
        workers = self.f._workers
        if not workers or self.f.cache_bytes == 0:
            return self.common
        return self.pinned.setdefault((i + self.f._offset) % len(workers), {})

    def leaves(self, name: str, fn, *extra, memo: bool = False) -> list[tuple[str, int]]:
        """One task ``fn(net, theta, src, i, *extra, *encoder)`` per chunk; ``memo``: ``fn``
        also takes ``memo=``, a key of the chunk unique to this graph (what pass 1 keeps for
        pass 2, :class:`worker.chunks._Kept`)."""
        keys = []
        for i in range(self.n):
            k = (self.key(name), i)
            f = partial(fn, memo=(self.tok, i)) if memo else fn
            self.pin(i)[k] = (f, self.net, self.th, self.src, i, *extra, *self.enc_args)
            keys.append(k)
        return keys

    @property
    def keeps(self) -> bool:
        """Whether pass 2 takes up where pass 1 left off on the chunks (a sigmoid-KL network
        with a sparse layer, chunks cached: what is kept is bounded by the cache's bound)."""
        net = self.net
        return net.kind == "sigmoid-kl" and bool(net.sparse_layers) and self.src.cache_bytes > 0

    def part_leaves(self, name: str, fn, parts, slots, *extra, memo: bool = False) -> list:
        """``fn(net, theta, src, i, rows, *extra, *encoder)`` of each part of a batch, one
        task per worker (placed by the parts' slots, :meth:`worker.batches.Batches.slots`)
        computing its parts in turn: a batch's few parts cost a task and a hop each
        otherwise. The leaves, in part order, are the items of those tasks' tuples (nested
        tasks, evaluated inside the tasks that add them up): the same sums in the same tree.
        ``memo``: ``fn`` also takes ``memo=``, a key of the part unique to this graph (what
        pass 1 keeps for pass 2, :class:`worker.chunks._Kept`).
        """
        n_workers = max(1, len(self.f._workers))
        groups: dict[int, list[int]] = {}
        for j, slot in enumerate(slots):
            groups.setdefault((slot + self.f._offset) % n_workers, []).append(j)
        leaves: list = [None] * len(parts)
        for w, js in groups.items():
            k = (self.key(name), w)
            layer = self.pin(slots[js[0]])
            items = tuple((*parts[j], (self.tok, j) if memo else None) for j in js)
            th = self.state_at(w)
            layer[k] = (_each_part, fn, self.net, th, self.src, items, *_put(extra, th))
            layer[k] += self.enc_args
            for pos, j in enumerate(js):
                leaves[j] = (operator.getitem, k, pos)
        self.groups = sorted(groups) if self.pinned else []
        return leaves

    def state_at(self, w: int):
        """What the tasks on worker ``w`` take for theta: the copy of the state there (or
        another copy: the workers changed), else :attr:`th`."""
        if not self.copies:
            return self.th
        return self.copies.get(w, self.copies[min(self.copies)])

    def tree(self, name: str, leaves: list) -> list:
        """The fixed-shape tree over ``leaves``; its roots."""
        return tree_sum(self.common, leaves, self.key(name), self.f.fan_in)

    def final(self, name: str, fn, *args) -> str:
        """The task ``fn(net, theta, *args)`` giving ``(J, grad)``."""
        key = self.key(name)
        self.common[key] = (fn, self.net, self.th, *args)
        return key

    def whole(self, m: int, passes: str) -> str:
        """One task evaluating every chunk."""
        key = self.key("whole")
        self.pin(0)[key] = (
            _whole,
            self.net,
            self.th,
            self.src,
            self.n,
            m,
            passes,
            self.f.fan_in,
            *self.enc_args,
        )
        return key

    def pass1_total(self, m: int) -> str:
        """The key of pass 1's total (just the count for a network without sparse layers)."""
        if not self.net.sparse_layers:
            key = self.key("count")
            self.common[key] = {"count": np.float64(m)}
            return key
        roots = self.tree("sum1", self.leaves("pass1", _chunk_pass1, memo=self.keeps))
        if len(roots) == 1:  # one chunk: its sums are the total
            return roots[0]
        key = self.key("sum1")
        self.common[key] = (_sum, *roots)
        return key

    def high_level_graph(self):
        """The layers: the common one, and one per worker of the pinned tasks."""
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        layers = {f"common-{self.tok}": MaterializedLayer(self.common)}
        deps: dict[str, set] = {f"common-{self.tok}": set()}
        for w, tasks in self.pinned.items():
            name = f"pinned-{self.tok}-{w}"
            layers[name] = MaterializedLayer(
                tasks,
                annotations={"workers": [self.f._workers[w]], "allow_other_workers": True},
            )
            deps[name] = set()
        return HighLevelGraph(layers, deps)


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
    target : {"previous", "input"}
        Targets: the stage's inputs (an autoencoder) or the original input x (with an
        encoder).
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
        target: Target = "previous",
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
        if target not in ("previous", "input"):
            raise ValueError(f"target: choose 'previous' or 'input', got {target!r}")
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
        n_out = n_raw if (encoder is not None and target == "input") else n_in
        if net.sizes[-1] != n_out:
            raise ValueError(
                f"net: output size {net.sizes[-1]} differs from the targets' {n_out} "
                f"(target={target!r})"
            )
        if target == "input" and encoder is None:
            self.target = "previous"  # the data are the stage's inputs
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
        item = np.dtype(obj.array_dtype(self.dtype)).itemsize
        m = self.info.shape[0]
        n = self.net.sizes[0]
        if self.encoder is not None and self.target == "input":
            n += self.info.shape[1]
        return m * n * item

    def _memory_budget(self) -> int:
        """Bytes a worker's chunk cache may use: :data:`CACHE_FRACTION` of its memory limit
        (or of the machine's memory per worker) less :data:`CACHE_RESERVED_BYTES`."""
        limit = self._mem_limit
        if not limit:
            import psutil

            limit = psutil.virtual_memory().total // max(1, len(self._workers))
        return max(0, int(CACHE_FRACTION * limit) - CACHE_RESERVED_BYTES)

    def _cache_budget(self) -> int:
        n = max(1, len(self._workers))
        budget = self._memory_budget()
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
        g = _Graph(self, np.asarray(theta, dtype=np.float64))
        single = self.single_task
        if single is None:
            single = g.n == 1 or self._stage_nbytes() <= SINGLE_TASK_BYTES
        if single:  # small: one task evaluates everything (same sums, same tree, same bits)
            final = g.whole(self.info.shape[0], self.passes)
        elif self.passes == "fused":
            roots = g.tree("sum", g.leaves("fused", _chunk_fused))
            final = g.final("final", _finalize_one, *roots)
        else:
            total1 = g.pass1_total(self.info.shape[0])
            leaves2 = g.leaves("pass2", _pass2_given_sums1, total1, memo=g.keeps)
            final = g.final("final", _finalize_two, total1, *g.tree("sum2", leaves2))
        return g.high_level_graph(), final

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
        J, grad = self._evaluate(lambda: self.graph(theta))
        grad = blas_ready(grad, np.float64)  # a view into a message frame may be unaligned
        dt = time.perf_counter() - t0
        self.stats.n_evals += 1
        self.stats.seconds += dt
        self.stats.last_seconds = dt
        self.stats.times.append(dt)
        return float(J), grad

    def _evaluate(self, build):
        """The result of the graph ``build() -> (hlg, key)``, sent again (built anew, for the
        workers there are then) after the scheduler's connection was lost, once the client
        has reconnected: an evaluation depends on theta alone, so it gives the same bits.

        Raises
        ------
        SchedulerLost
            If the client does not get its scheduler back.
        """
        for attempt in range(RESUBMITS + 1):
            future = None
            try:
                self._refresh_workers(force=attempt > 0)
                hlg, key = build()
                future = self.client.get(hlg, key, sync=False)
                return self._wait(future)
            except Exception as exc:
                if not lost_with_scheduler(exc, future) or attempt == RESUBMITS:
                    raise
                time.sleep(POLL_SECONDS)  # the client may not have noticed the loss yet
                wait_reconnected(self.client, self.should_stop)
        raise AssertionError("unreachable")

    def _wait(self, future, release: bool = True):
        """The result of an evaluation's future, checking ``should_stop`` every
        :data:`POLL_SECONDS` (an evaluation may wait long for busy or absent workers).

        Raises
        ------
        WorkersDied
            For Dask's ``KilledWorker`` (the workers running a task all died).
        """
        from distributed import KilledWorker, wait

        stranded = StrandedCheck(self.client)
        try:
            while True:
                try:
                    wait([future], timeout=POLL_SECONDS)
                    break
                except TimeoutError:
                    if self.should_stop is not None and self.should_stop():
                        raise Cancelled("stopped during an evaluation") from None
                    stranded()
            try:
                return future.result()
            except KilledWorker as exc:
                chunk = self.info.chunk_rows * self._stage_nbytes() // max(1, self.info.shape[0])
                raise workers_died(exc, self.client, chunk_bytes=chunk) from exc
        finally:
            if release:
                if not future.done():
                    with contextlib.suppress(Exception):
                        self.client.cancel(future)
                future.release()

    @property
    def n_evals(self) -> int:
        """Evaluations so far."""
        return self.stats.n_evals


# --------------------------------------------------------------------------- minibatches


#: The most workers that keep a copy of a chained step's state (each needs every part's sums).
MAX_COPIES = 4


_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def large_graph_expected():
    """Silence distributed's "Sending large graph" warning for one submission.

    ``warnings.catch_warnings`` saves the process's filter list on entry and puts it back on
    exit, so two threads inside it at once (the service runs several jobs) could leave the
    other's filter behind, for good; the lock lets one thread in at a time (the submission it
    wraps does not wait for the graph to run).
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph")
        yield


class _State:
    """Where a graph being built puts the copy of the state of the worker a task runs on."""

    def __repr__(self) -> str:
        return "STATE"


STATE = _State()


def _put(task, value):
    """``task`` (a nested tuple) with :data:`STATE` replaced by ``value``."""
    if task is STATE:
        return value
    if isinstance(task, tuple):
        return tuple(_put(t, value) for t in task)
    return task


@dataclass(frozen=True)
class StateCopies:
    """The futures of the copies of one step's state, by worker index (the same bits each:
    :meth:`BatchObjective.step_graph`)."""

    futures: dict[int, Any]

    @property
    def first(self):
        """One of them (the loop fetches a state, its record or its arrays, from it)."""
        return self.futures[min(self.futures)]

    def release(self) -> None:
        """Release every copy."""
        for f in self.futures.values():
            with contextlib.suppress(Exception):
                f.release()


def _each_part(fn, net: Network, theta, src, items, *extra) -> tuple:
    """``fn(net, theta, src, i, rows, *extra[, memo=memo])`` of each part ``(i, rows, memo)``
    of ``items`` in turn (the parts of a batch on one worker)."""
    return tuple(
        fn(net, theta, src, i, rows, *extra, **({} if memo is None else {"memo": memo}))
        for i, rows, memo in items
    )


def _same(x):
    return x


def _ema_of(state) -> dict | None:
    return {int(k): v for k, v in state.rho_ema.items()} if state.rho_ema else None


def _advance_on_worker(advance, state, out, lr: float, rows: int):
    """``advance(state, J, grad, rho_hat, lr, rows)`` from a batch's ``(J, grad, rho_hat)``,
    under one BLAS thread (the stage's loop steps under one too: the same bits)."""
    J, grad, rho_hat = out
    with one_blas_thread():
        return advance(state, float(J), blas_ready(grad, np.float64), rho_hat, lr, rows)


def _record_of(state):
    """``state`` without its arrays (a few scalars: what a history entry needs)."""
    return state.replace(theta=None, m=None, v=None)


def _ema(net: Network, sums1: dict, previous: dict | None, decay: float) -> dict:
    """Each sparse layer's rho_hat of a batch (pass-1 totals ``sums1``), averaged with the
    ``previous`` running average when there is one."""
    return obj.batch_stats(net, sums1, previous, decay)


class BatchObjective(DistributedObjective):
    """The objective of one minibatch, as one Dask graph over the chunks holding its rows.

    ``f(theta, parts) -> (J, grad, rho_hat)``: ``J`` and ``grad`` of the batch objective
    (the mean over the batch's rows, weight decay, and the KL penalty of the batch's mean
    activations), or, with ``rho_ema``, the same ``J`` and a gradient whose sparsity term uses
    the running average ``decay * rho_ema + (1 - decay) * rho_hat_batch`` instead of the
    batch's own ``rho_hat`` (less noisy for small batches, not the gradient of any batch
    objective). ``rho_hat`` is what the next step's ``rho_ema`` is.

    The parts of a batch (its rows grouped by chunk, :meth:`worker.batches.Batches.parts`)
    are computed where their chunks are cached and added by the same fixed-shape tree, in
    chunk order: the same bits on any number of workers. Parameters as
    :class:`DistributedObjective`; the chunk cache is on by default (bounded by the workers'
    memory, so a window of chunks stays in memory while its batches are read).
    """

    def __init__(self, *args, cache: bool | None = True, **kwargs) -> None:
        super().__init__(*args, cache=cache, single_task=False, **kwargs)

    def _cache_budget(self) -> int:
        return 0 if self._cache_request is False else self._memory_budget()

    def batch_graph(
        self, theta: np.ndarray | None, parts, rho_ema: dict | None, decay: float, slots, g=None
    ):
        """The graph of one batch and the key of its ``(J, grad, rho_hat)`` (rho_hat None for
        fused passes); ``g``: a graph being built, whose theta is that of a state."""
        g = _Graph(self, np.asarray(theta, dtype=np.float64)) if g is None else g
        if g.state is not None:  # the running averages come with the state too
            rho_ema = (_ema_of, g.state)
        if self.passes == "fused":  # the batch's own rho_hat, inside its finalize
            roots = g.tree("sum", g.part_leaves("fused", chunks._part_fused, parts, slots))
            final = g.final("final", chunks._finalize_batch_fused, *roots)
            return g.high_level_graph(), final
        # Pass 1's total and the rho_hat pass 2 uses are a few vectors: each task that needs
        # them adds them up itself (nested tasks), a hop less on the step's path
        if self.net.sparse_layers:
            leaves1 = g.part_leaves("pass1", chunks._part_pass1, parts, slots, memo=True)
            roots1 = g.tree("sum1", leaves1)
            total1 = (_sum, *roots1)
        else:
            total1 = {"count": np.float64(sum(len(r) for _, r in parts))}
        rho = (_ema, self.net, total1, rho_ema, decay)
        memo = bool(self.net.sparse_layers)  # pass 2 takes up where pass 1 left off
        leaves2 = g.part_leaves("pass2", chunks._part_pass2, parts, slots, rho, memo=memo)
        roots2 = g.tree("sum2", leaves2)
        final = g.final("final", chunks._finalize_batch, total1, rho, *roots2)
        return g.high_level_graph(), final

    def step_graph(self, state, parts, slots, decay: float, advance, lr: float):
        """The graph of one optimiser step: the batch of ``parts`` evaluated at the theta of
        ``state`` (a :class:`~sae.optimize.stochastic.StochasticState`, or the
        :class:`StateCopies` an earlier step's graph gives) as :meth:`batch_graph`, then
        ``advance(state, J, grad, rho_hat, lr, rows)`` on each worker of the batch's parts
        (at most :data:`MAX_COPIES`): the copies of the state after the step.

        Returns
        -------
        hlg : dask HighLevelGraph
        keys : (dict of int to key, str)
            The keys of the new state's copies by worker index, and the key of its record
            (the state without its arrays: what the stage's history needs from every step).
        """
        g = _Graph(self, None, state=state)
        _, out = self.batch_graph(None, parts, None, decay, slots, g=g)
        rows = sum(len(r) for _, r in parts)
        final = g.common.pop(out)
        name = g.key("state")
        copies = {}
        # Each worker of the batch's parts makes its own copy of the new state from the
        # batch's sums (the same computation: the same bits), so the next step's tasks find
        # theta where they run and the workers exchange just their sums. The batch's
        # finalize runs inside each: a task less on the step's path.
        for w in g.groups[:MAX_COPIES] or [0]:
            src = g.state_at(w)
            layer = g.pinned[w] if g.groups else g.common
            copies[w] = (name, w)
            layer[copies[w]] = (_advance_on_worker, advance, src, _put(final, src), lr, rows)
        record = g.key("record")
        g.common[record] = (_record_of, copies[min(copies)])
        return g.high_level_graph(), (copies, record)

    def submit_step(self, state, parts, slots, decay: float, advance, lr: float):
        """Send :meth:`step_graph`; the :class:`StateCopies` of the new state and the future
        of its record."""
        self._refresh_workers()
        hlg, (copies, record) = self.step_graph(state, parts, slots, decay, advance, lr)
        with large_graph_expected():  # a chain's first state is in its graph, by design:
            # so Dask can recompute a lost state from there (a scattered one is just lost)
            *new, rec = self.client.get(hlg, [*copies.values(), record], sync=False)
        self.stats.n_evals += 1
        return StateCopies(dict(zip(copies, new, strict=True))), rec

    def result(self, future, release: bool = False):
        """The value of a future of :meth:`submit_step`, waited for as an evaluation
        (``should_stop`` checked every :data:`POLL_SECONDS`, stranded tasks placed)."""
        return self._wait(future, release=release)

    def __call__(self, theta, parts, rho_ema: dict | None = None, decay: float = 0.99, slots=None):
        """``(J, grad, rho_hat)`` of the batch made of ``parts`` at ``theta``; ``slots`` place
        the parts on the workers (default: by chunk index, like the chunk cache).

        Raises
        ------
        Cancelled
            If ``should_stop()`` is true before or during the evaluation.
        """
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("stopped before a step")
        t0 = time.perf_counter()
        if rho_ema is not None and self.passes == "fused":
            raise ValueError("sparsity_estimate: a running average needs passes 'two'")
        slots = [i for i, _ in parts] if slots is None else slots
        J, grad, rho_hat = self._evaluate(
            lambda: self.batch_graph(theta, parts, rho_ema, decay, slots)
        )
        grad = blas_ready(grad, np.float64)
        dt = time.perf_counter() - t0
        self.stats.n_evals += 1
        self.stats.seconds += dt
        self.stats.last_seconds = dt
        self.stats.times.append(dt)
        return float(J), grad, rho_hat


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
        target: Target = "previous",
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
        if target == "input" and encoder is None:
            target = "previous"
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
    "DistributedObjective",
    "LocalObjective",
    "SchedulerLost",
    "StrandedCheck",
    "WorkersDied",
    "array_token",
    "dataset_token",
    "lost_with_scheduler",
    "reschedule_stranded",
    "wait_reconnected",
    "workers_died",
]
