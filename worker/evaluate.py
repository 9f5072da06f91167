"""A trained model's metrics over a dataset's chunks (:mod:`sae.metrics`), and a job's.

:func:`evaluate` streams the chunks (all of them, or a held-out split): each chunk's
:func:`sae.metrics.metric_sums` are added by the fixed-shape tree of :mod:`worker.tree`, as
one Dask graph on a cluster or, without a client, chunk by chunk in this process with
:func:`~worker.tree.streaming_tree_sum` (one chunk in memory at a time). Both add the same
sums in the same order with one BLAS thread, so the metrics are bitwise the same in this
process and on any number of workers. The graph::

    shift-<job>                       the first row of the first evaluated chunk (the shift K
       │                              of the variance sums, see sae.metrics)
    metrics-<job> (chunk i) ...  ─ msum-<job> (tree) ─ mtotal-<job>

:func:`write_metrics` writes ``metrics.json`` and ``density.png``; :func:`evaluate_job`
evaluates a job folder's final model and writes both at the job's root; :func:`read_metrics`
reads them back (the service's job status).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae import metrics as sm
from sae import objective as obj
from sae.network import Network
from worker import layout
from worker.dataset import open_dataset, read_chunk
from worker.threads import single_threaded
from worker.tree import DEFAULT_FAN_IN, _sum, streaming_tree_sum, tree_sum


# ----------------------------------------------------------------------------- tasks
def _first_row(path: str, i: int, dtype: str, scale: float) -> np.ndarray:
    """The first row of chunk ``i`` as float64, shape (n,): the shift of the variance sums."""
    return np.array(read_chunk(path, i, dtype, scale)[0], dtype=np.float64)


@single_threaded
def _chunk_metrics(
    net: Network,
    theta: np.ndarray,
    path: str,
    i: int,
    dtype: str,
    scale: float,
    shift: np.ndarray,
    threshold: float,
) -> obj.Sums:
    """:func:`sae.metrics.metric_sums` of chunk ``i``."""
    X = read_chunk(path, i, dtype, scale)
    return sm.metric_sums(net, theta, X, dtype, shift=shift, threshold=threshold)


# ----------------------------------------------------------------------------- checks
def _chunk_ids(chunks: Sequence[int] | None, n_chunks: int) -> list[int]:
    """The chunks to evaluate, ascending and once each (the tree's order)."""
    if chunks is None:
        return list(range(n_chunks))
    ids = []
    for c in chunks:
        if isinstance(c, bool) or not isinstance(c, int | np.integer):
            raise ValueError(f"chunks: chunk ids must be integers, got {c!r}")
        if not 0 <= c < n_chunks:
            raise ValueError(f"chunks: chunk {c} is not one of the dataset's 0..{n_chunks - 1}")
        ids.append(int(c))
    if not ids:
        raise ValueError("chunks: give at least one chunk to evaluate")
    return sorted(set(ids))


def check_fit(net: Network, n_features: int, dataset: str) -> None:
    """Raise unless the model reads and reconstructs rows of ``n_features``.

    Raises
    ------
    ValueError
        Naming ``dataset`` (a width mismatch) or ``model`` (an output of another width).
    """
    if net.sizes[0] != n_features:
        raise ValueError(
            f"dataset: {dataset} has {n_features} features but the model's input layer has "
            f"{net.sizes[0]} units"
        )
    sm.check_model(net)


def _clean(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name).strip("_")
    return s or "evaluate"


# ----------------------------------------------------------------------------- evaluate
def evaluate(
    net: Network,
    theta: np.ndarray,
    dataset_path: str | Path,
    *,
    client=None,
    chunks: Sequence[int] | None = None,
    dtype: str = "float64",
    threshold: float = sm.DEFAULT_THRESHOLD,
    fan_in: int = DEFAULT_FAN_IN,
    job: str = "evaluate",
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """The metrics of a model on a dataset (see :mod:`sae.metrics`), streamed over chunks.

    Parameters
    ----------
    net : Network
        Any kind; one hidden layer or deep (latents: the code layer).
    theta : ndarray of shape (net.n_params,)
    dataset_path : str or Path
        A dataset written by :func:`worker.dataset.write_dataset` (local path or URL).
    client : distributed.Client, optional
        Evaluate as one Dask graph on its cluster; None: in this process, one chunk at a time.
        Both give bitwise the same metrics.
    chunks : sequence of int, optional
        Chunk ids to evaluate (e.g. a held-out split); default all.
    dtype : {"float64", "float32"}
        Compute dtype of the forward pass (chunks are read in it); sums are float64.
    threshold : float
        Activity threshold of the classic (sigmoid-kl) units, on their [0, 1] scale.
    fan_in : int
        Fan-in of the reduction tree.
    job : str
        Name in the task keys (``metrics-<job>``, ``msum-<job>``).
    on_chunk : callable, optional
        In this process: called with the examples of each chunk once it is evaluated.

    Returns
    -------
    metrics : dict
        :func:`sae.metrics.finalize_metrics`'s (``density``: ndarray of shape (h,)), plus
        ``dataset``, ``dtype``, ``chunks`` (the ids evaluated, None for all) and
        ``n_chunks`` (how many).

    Raises
    ------
    ValueError
        Naming the argument: ``dtype``, ``threshold``, ``theta``, ``chunks``, ``dataset`` (a
        width mismatch or no examples), ``model`` (an output of another width).
    worker.dataset.ChunkError
        If a chunk is missing, unreadable or non-finite (the message names it).
    """
    if dtype not in obj.DTYPES:
        raise ValueError(f"dtype: choose one of {sorted(obj.DTYPES)}, got {dtype!r}")
    threshold = sm.check_threshold(threshold)
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (net.n_params,):
        raise ValueError(f"theta: expected shape ({net.n_params},), got {theta.shape}")
    path = str(dataset_path)
    info = open_dataset(path)
    check_fit(net, info.shape[1], path)
    if info.n_chunks == 0:
        raise ValueError(f"dataset: {path} holds no examples")
    ids = _chunk_ids(chunks, info.n_chunks)
    if client is None:
        shift = _first_row(path, ids[0], dtype, info.scale)

        def parts():
            for i in ids:
                sums = _chunk_metrics(net, theta, path, i, dtype, info.scale, shift, threshold)
                if on_chunk is not None:
                    on_chunk(int(sums["count"]))
                yield sums

        total = streaming_tree_sum(parts(), len(ids), fan_in)
    else:
        dsk, key = metrics_graph(net, theta, path, ids, dtype, info.scale, threshold, fan_in, job)
        total = client.get(dsk, key)
    out = sm.finalize_metrics(net, total, threshold)
    out.update(
        dataset=path,
        dtype=dtype,
        chunks=None if chunks is None else ids,
        n_chunks=len(ids),
    )
    return out


def metrics_graph(
    net: Network,
    theta: np.ndarray,
    path: str,
    ids: Sequence[int],
    dtype: str,
    scale: float,
    threshold: float,
    fan_in: int = DEFAULT_FAN_IN,
    job: str = "evaluate",
) -> tuple[dict, str]:
    """The Dask graph of :func:`evaluate` over the chunks ``ids`` and the key of its total.

    Returns
    -------
    (dsk, key) : (dict, str)
        A low-level graph (theta embedded once) and the key of the metric sums' total.
    """
    name = f"{_clean(job)}-{uuid.uuid4().hex[:8]}"
    th, sh, total = f"theta-{name}", f"shift-{name}", f"mtotal-{name}"
    dsk: dict[Any, Any] = {th: theta, sh: (_first_row, path, ids[0], dtype, scale)}
    leaves = []
    for j, i in enumerate(ids):
        k = (f"metrics-{name}", j)
        dsk[k] = (_chunk_metrics, net, th, path, i, dtype, scale, sh, threshold)
        leaves.append(k)
    roots = tree_sum(dsk, leaves, f"msum-{name}", fan_in)
    dsk[total] = (_sum, *roots)
    return dsk, total


# ----------------------------------------------------------------------------- files
def _jsonable(value: Any) -> Any:
    """``value`` for JSON: arrays as lists, numpy scalars as Python, non-finite floats None."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(folder: str | Path, metrics: dict, *, name: str = layout.METRICS) -> Path:
    """Write ``metrics.json`` (``name``) and, when ``metrics`` holds the density,
    ``density.png`` into ``folder``, atomically.

    The JSON holds every figure but the per-latent ``density`` array (its histogram,
    ``density_histogram``, is there); non-finite numbers are written as null.

    Returns
    -------
    path : Path
        The JSON file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(
        _jsonable({k: v for k, v in metrics.items() if k != "density"}), indent=1, allow_nan=False
    ).encode()
    path = folder / name
    layout.write_bytes(path, lambda fh: fh.write(payload))
    if metrics.get("density") is not None:
        from sae.display import save_density_png

        save_density_png(metrics["density"], folder / layout.DENSITY, metrics.get("examples"))
    return path


def read_metrics(folder: str | Path) -> dict | None:
    """The ``metrics.json`` of ``folder``, or None when there is none (or it is unreadable)."""
    path = layout.artifact(Path(folder), layout.METRICS)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def evaluate_job(
    root: str | Path, client=None, *, threshold: float = sm.DEFAULT_THRESHOLD
) -> dict | None:
    """Evaluate a job folder's final model and write ``metrics.json`` and ``density.png``
    at its root.

    The model is the job's ``model.npz`` (a deep job's whole unrolled network: its latents
    are the code layer's units); the data are the job's dataset (``job.json``), on the
    held-out chunks when the spec has a ``validation_fraction``
    (:meth:`worker.schedule.Schedule.held_out`), else on all of them, in the spec's dtype.

    Parameters
    ----------
    root : str or Path
        The job folder.
    client : distributed.Client, optional
        Evaluate on its cluster (default: in this process).
    threshold : float
        Activity threshold of the classic units.

    Returns
    -------
    metrics : dict or None
        As :func:`evaluate` (``dataset``: as the spec names it), plus ``split``
        (``"held-out"`` or ``"all"``) and ``model``; None when the folder holds no job or no
        model yet (nothing is written then).

    Raises
    ------
    ValueError, worker.dataset.DatasetError, worker.dataset.ChunkError
        If the dataset is gone, no longer fits the model, or a chunk cannot be read.
    """
    from worker.schedule import Schedule
    from worker.spec import TrainSpec

    root = Path(root)
    model = layout.artifact(root, layout.MODEL)
    if model is None:
        return None
    try:
        job = layout.read_job(root)
    except FileNotFoundError:
        return None
    net, theta, _ = layout.load_model(model)
    path = str(job["dataset"]["path"])
    saved = dict(job["spec"])
    if saved.get("dtype") == "bfloat16":  # metrics are float32 forward passes: no PyTorch
        saved["dtype"] = "float32"
    spec = TrainSpec.model_validate(saved)
    separate = job.get("validation_dataset")
    if separate is not None:  # a validation dataset of its own: all of it
        path, held, split, name = str(separate["path"]), (), "validation dataset", None
    else:
        held = Schedule(spec, open_dataset(path), root).held_out()
        split, name = ("held-out" if held else "all"), spec.dataset
    metrics = evaluate(
        net,
        theta,
        path,
        client=client,
        chunks=list(held) if held else None,
        dtype=spec.dtype,
        threshold=threshold,
        job=f"evaluate-{root.resolve().name}",
    )
    # the dataset as the spec names it (a service's data root stays out of its job status)
    metrics.update(split=split, model=layout.MODEL, dataset=name or spec.validation_dataset)
    write_metrics(root, metrics)
    return metrics
