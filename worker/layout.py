"""The job folder: its file names, and reading and writing what is in them.

Used by the worker, which writes a job's folder, and by the service and the CLI, which read it.
A one-layer job's stage is the folder itself; a deep job has a folder per stage::

    job.json          the spec, the dataset, where each stage ran, the dashboard URL
    state.npz         the optimizer's whole state after the last iteration (atomic, fsynced)
    state.npz.pairs/  the L-BFGS memory pairs the state lists (one write-once file each)
    history.json      one entry per iteration: iteration, cost, grad_norm (the 2-norm),
                      evaluations, seconds, and for deep jobs the stage ("pretrain k/K",
                      "finetune"); iterations restart at 0 in each stage
    model.npz         W1..WL, b1..bL from input to output, theta, and spec (JSON, holding the
                      network dict so activations are known)
    best.npz          stochastic stages with a validation set: the model at the best held-out
                      cost (history entries carry val_cost)
    filters.png       the first layer's filters (refreshed while training)
    cost.png          cost per iteration (one line per stage)
    metrics.json      the final model's reconstruction and sparsity metrics on the held-out
                      chunks (or all of them): worker.evaluate, sae.metrics
    density.png       the histogram of its latents' log10 firing frequencies
    stage-1/ ...      deep jobs: pretraining stage k (the same files, plus done.json once the
    stage-K/          stage has finished; the stage's own sparse autoencoder in model.npz)
    finetune/         deep jobs: the unrolled network trained end to end

Marker files of the local execution (one task next to the data): ``.cancel`` (asks the task to
stop), ``.owner`` (the run that owns the folder), ``.started-<owner>`` (the task has started;
a rerun resumes).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sae.atomic import atomic_write
from sae.network import Network
from sae.optimize import PAIRS_SUFFIX
from worker.stage_id import StageId

JOB = "job.json"
STATE = "state.npz"
STATE_PAIRS = STATE + PAIRS_SUFFIX
HISTORY = "history.json"
MODEL = "model.npz"
#: The model at the best held-out cost of a stochastic stage with a validation set.
BEST = "best.npz"
FILTERS = "filters.png"
COST = "cost.png"
#: The final model's metrics (:func:`worker.evaluate.evaluate_job`) and its latents' density.
METRICS = "metrics.json"
DENSITY = "density.png"
DONE = "done.json"
CANCEL = ".cancel"
OWNER = ".owner"
STARTED_PREFIX = ".started-"

#: What a fresh (not resumed) job removes from its folder before it starts.
_RESULTS = (STATE, HISTORY, MODEL, BEST, FILTERS, COST, METRICS, DENSITY)


def stage_dir(root: Path, stage: StageId) -> Path:
    """The folder of one stage of the job in ``root``."""
    return root if stage.folder is None else root / stage.folder


def write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file atomically (rename into place), without fsync.

    History, models and pictures are rewritten every iteration; the optimizer state, which
    resume needs, is fsynced by ``OptimizerState.save``.
    """
    atomic_write(Path(path), write, fsync=False)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    payload = json.dumps(data, allow_nan=True).encode()
    write_bytes(Path(path), lambda fh: fh.write(payload))


def read_history(path: Path) -> list[dict]:
    """The entries of a history.json ([] when absent)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []


def read_job(root: Path) -> dict:
    """The ``job.json`` of the job in ``root``.

    Raises
    ------
    FileNotFoundError
        If the folder holds no job.
    """
    return json.loads((Path(root) / JOB).read_text())


def save_model(path: Path, net: Network, theta: np.ndarray, spec: dict | None = None) -> Path:
    """Write ``model.npz``: ``W1..WL``, ``b1..bL``, ``theta`` and ``spec`` (a JSON string).

    ``spec`` holds the given metadata plus ``"network": net.to_dict()``. ``W1..WL`` are the
    weights the model computes with (a unit-norm decoder normalised); ``theta`` is as trained.
    """
    Ws, bs = net.unpack(net.effective(theta))
    meta = dict(spec or {})
    meta["network"] = net.to_dict()
    arrays = {f"W{l}": W for l, W in enumerate(Ws, start=1)}
    arrays.update({f"b{l}": b for l, b in enumerate(bs, start=1)})
    arrays["theta"] = np.asarray(theta, dtype=np.float64)
    arrays["spec"] = np.array(json.dumps(meta))
    write_bytes(Path(path), lambda fh: np.savez(fh, **arrays))
    return Path(path)


def load_model(path: Path) -> tuple[Network, np.ndarray, dict]:
    """Read a ``model.npz``: ``(net, theta, spec_dict)``."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["spec"][()]))
        theta = np.array(npz["theta"])
    return Network.from_dict(meta["network"]), theta, meta


def reset(root: Path) -> None:
    """Remove what an earlier run of a job left in ``root`` (a fresh start, not a resume)."""
    for name in _RESULTS:
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    shutil.rmtree(root / STATE_PAIRS, ignore_errors=True)
    for sub in [*root.glob("stage-*"), root / StageId.finetune(0).folder]:
        if (sub / HISTORY).is_file() or (sub / STATE).is_file():  # a stage's, nothing else
            shutil.rmtree(sub, ignore_errors=True)


def clear_cancel(root: Path) -> None:
    """Remove the cancel request of the job in ``root``."""
    with contextlib.suppress(FileNotFoundError):
        (root / CANCEL).unlink()


def filters_picture(root: Path) -> Path | None:
    """The job's filters picture: the job's own, else (a deep job still pretraining) its
    first stage's; None before either is drawn."""
    own = root / FILTERS
    if own.is_file():
        return own
    stages = sorted(root.glob(f"stage-*/{FILTERS}"))
    return stages[0] if stages else None


def artifact(root: Path, name: str) -> Path | None:
    """The file ``name`` (one of :data:`HISTORY`, :data:`MODEL`, :data:`COST`, ...) of the
    job in ``root``, or None when it is not written yet."""
    path = root / name
    return path if path.is_file() else None
