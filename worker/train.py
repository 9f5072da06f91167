"""Train the autoencoder a spec describes: a TrainSpec in, a trained model and its history out.

:func:`train` finds or makes a Dask client and runs the job's schedule of stages
(:func:`worker.job.run_job`). The job folder's files are listed in :mod:`worker.layout`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from worker.job import TrainResult, run_job
from worker.schedule import ExecutionChoice
from worker.spec import TrainSpec
from worker.stage import REFRESH_SECONDS, Hooks


def train(
    spec: TrainSpec,
    out_dir: str | os.PathLike,
    *,
    client=None,
    dataset_path: str | None = None,
    validation_path: str | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    execution: ExecutionChoice = "auto",
    job: str | None = None,
    cluster_options: dict | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
    engine_options: dict | None = None,
) -> TrainResult:
    """Train the autoencoder a spec describes, on a Dask cluster.

    Parameters
    ----------
    spec : TrainSpec
    out_dir : path
        Job folder (created); see :mod:`worker.layout` for its files.
    client : distributed.Client, optional
        Default: an embedded LocalCluster for the job's duration (``cluster_options`` are
        passed to :func:`worker.cluster.get_client`).
    dataset_path : str, optional
        The dataset (default ``spec.dataset``).
    validation_path : str, optional
        The separate validation dataset (default ``spec.validation_dataset``).
    on_iteration : callable, optional
        Called with each history entry (iteration, cost, grad_norm, evaluations, seconds, and
        the stage of a deep job).
    should_stop : callable, optional
        Polled after each iteration (and between evaluations); True cancels the job, whose
        last checkpoint stays usable for ``resume``.
    resume : bool
        Continue from the checkpoints in ``out_dir`` (bitwise the uninterrupted trajectory).
    execution : {"auto", "local", "distributed"}
        Where the stages run (:mod:`worker.execution`); ``"auto"`` runs a stage whose data
        fit in :data:`worker.schedule.LOCAL_BYTES` as one task next to them.
    job : str, optional
        Name in task keys (default: the folder's name).
    cluster_options : dict, optional
    refresh_seconds : float
        Interval of filters.png and model.npz refreshes while training.
    engine_options : dict, optional
        Extra arguments of :class:`worker.engine.DistributedObjective` (``cache``,
        ``fan_in``, ``single_task``) for stages that run in the driver.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        When the spec does not fit the dataset (naming the field).
    worker.dataset.ChunkError
        When a chunk is missing, unreadable or non-finite (naming the chunk).
    """
    kwargs = dict(
        dataset_path=dataset_path,
        validation_path=validation_path,
        hooks=Hooks(on_iteration, should_stop),
        resume=resume,
        execution=execution,
        job=job,
        refresh_seconds=refresh_seconds,
        engine_options=engine_options,
    )
    if client is not None:
        return run_job(spec, out_dir, client=client, **kwargs)
    from worker.cluster import get_client

    with get_client(**(cluster_options or {})) as (c, _):
        return run_job(spec, out_dir, client=c, **kwargs)
